-- walsync tenant mode: the tenant-mode twins of 20261207000004_fence_holder.sql.
-- push accepts a leased run's entries only from the lease's holder with its
-- current token, and lease_acquire starts a run's tokens above the ones its
-- record carries (see that file), each query confined to the caller's tenant
-- as in 20261123000101_tenant_mode.sql, whose functions these replace (applied
-- after it: tenant files run in name order). The functions keep their owner
-- (walsync_tenant_api, so Row Level Security applies to them) and grants.
-- Plain SQL. Safe to apply more than once.

alter table walsync.fenced add column if not exists holder text;

create or replace function walsync_api.push(
  p_node text, p_through_lsn bigint,
  p_lsn bigint[], p_idx integer[], p_key text[], p_deleted boolean[], p_data bytea[],
  p_codec smallint[], p_vv jsonb[], p_hlc bigint[], p_fence bigint[], p_value_hash text[],
  p_value_json text[])
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
set plan_cache_mode = auto
set jit = off
as $$
declare
  v_tenant      text := walsync.require_tenant();
  v_n           integer := coalesce(cardinality(p_lsn), 0);
  v_head        bigint;
  v_entry_pos   bigint[];
  v_sibling_pos bigint[];
  v_drop        tid[];
  v_ref_n       bigint[];  -- ordinals, runs, current tokens and holders of the refused entries
  v_ref_run     text[];
  v_ref_current bigint[];
  v_ref_holder  text[];
  v_fenced      jsonb;
  v_max_hlc     bigint;
  v_inserted    bigint := 0;
  v_merged      bigint := 0;
  v_acked       bigint;
  v_min         bigint;
  v_max         bigint;
begin
  if p_node is null or p_node = '' then
    raise exception 'push needs a node id' using errcode = '22023';
  end if;
  if coalesce(cardinality(p_idx), 0) <> v_n or coalesce(cardinality(p_key), 0) <> v_n
     or coalesce(cardinality(p_deleted), 0) <> v_n or coalesce(cardinality(p_codec), 0) <> v_n
     or coalesce(cardinality(p_vv), 0) <> v_n or coalesce(cardinality(p_hlc), 0) <> v_n
     or cardinality(p_data) <> v_n or cardinality(p_fence) <> v_n
     or cardinality(p_value_hash) <> v_n or cardinality(p_value_json) <> v_n then
    raise exception 'push: the entry arrays differ in length' using errcode = '22023';
  end if;
  -- p_data, p_fence, p_value_hash and p_value_json may be null (all nulls / zeros)
  -- positions are per tenant: tenants push without waiting for each other
  perform pg_advisory_xact_lock(hashtext('walsync.push'), hashtext(v_tenant));
  insert into nodes (tenant, node_id) values (v_tenant, p_node) on conflict do nothing;
  insert into head (tenant, pos) values (v_tenant, 0) on conflict do nothing;
  select pos into v_head from head where tenant = v_tenant for update;
  -- the batch's LSN range bounds the duplicate checks below to an index range (as
  -- constants: a bound taken from the batch inside the query would not be one)
  select min(l), max(l) into v_min, v_max from unnest(p_lsn) l;
  -- The deciding statement: a big batch gets a plan made for its arrays (their
  -- sizes, its LSN range); a small one reuses the cached generic plan.
  perform set_config('plan_cache_mode',
                     case when v_n > 64 then 'force_custom_plan' else 'force_generic_plan' end,
                     true);
  with x as materialized (
    select u.n, u.lsn, u.idx, u.key, coalesce(u.fence, 0) as fence, u.vv,
           walsync.run_of(u.key) as run_id
    from unnest(p_lsn, p_idx, p_key, p_fence, p_vv) with ordinality
         as u(lsn, idx, key, fence, vv, n)
  ),
  -- Entries already stored (a re-sent batch): skipped, neither merged nor refused.
  known as materialized (
    select x.n from x
    where exists (select 1 from entries e
                  where e.tenant = v_tenant and e.origin = p_node and e.lsn = x.lsn
                    and e.key = x.key and e.lsn between v_min and v_max)
  ),
  -- Fencing: a leased run's entry is accepted only from the lease's holder with
  -- the lease's current token; the rest is refused (recorded below), never
  -- merged. A run without a lease is no one's: its entries merge like any key's.
  refused as materialized (
    select x.n, x.lsn, x.key, x.run_id, x.fence, l.token as current, l.holder
    from x join leases l on l.tenant = v_tenant and l.run_id = x.run_id
    where not exists (select 1 from known k where k.n = x.n)
      and (l.holder <> p_node or x.fence <> l.token)
  ),
  -- An entry sent twice in one batch counts once (distinct on its identity).
  incoming as (
    select distinct on (x.lsn, x.key) x.* from x
    where not exists (select 1 from known k where k.n = x.n)
      and not exists (select 1 from refused r where r.lsn = x.lsn and r.key = x.key)
      and not exists (select 1 from fenced f
                      where f.tenant = v_tenant and f.origin = p_node and f.lsn = x.lsn
                        and f.key = x.key and f.lsn between v_min and v_max)
    order by x.lsn, x.key, x.idx
  ),
  numbered as materialized (
    select i.*, v_head + row_number() over (order by i.lsn, i.idx, i.key) as pos
    from incoming i
  ),
  -- Merge the newest new version of each key (a node's later local write
  -- dominates its earlier ones, so the earlier ones would be dropped anyway).
  latest as (
    select distinct on (nb.key) nb.* from numbered nb order by nb.key, nb.lsn desc, nb.idx desc
  ),
  -- Each key's stored siblings, read once through the primary key (one index
  -- probe per key): is the new version dominated by (or equal to) one of them,
  -- and which of them does it dominate ("a <= b" is walsync.vv_leq written out).
  candidates as materialized (
    select l.n, l.pos, p.dropping from latest l
    cross join lateral (
      select coalesce(bool_or(not exists (
                 select 1 from jsonb_each_text(l.vv) a
                 where a.value::bigint > coalesce((s.vv ->> a.key)::bigint, 0))), false)
               as dominated,
             array_agg(s.ctid) filter (where not exists (
                 select 1 from jsonb_each_text(s.vv) a
                 where a.value::bigint > coalesce((l.vv ->> a.key)::bigint, 0)))
               as dropping
      from siblings s where s.tenant = v_tenant and s.key = l.key
    ) p
    where not p.dominated
  )
  -- By ordinal: the entry's position if it is new (else 0), and again if it is
  -- merged into siblings; the siblings it drops; what fencing refused.
  select array_agg(coalesce(nb.pos, 0) order by x.n),
         array_agg(coalesce(c.pos, 0) order by x.n),
         (select array_agg(t) from candidates c2, unnest(c2.dropping) t),
         (select array_agg(r.n order by r.n) from refused r),
         (select array_agg(r.run_id order by r.n) from refused r),
         (select array_agg(r.current order by r.n) from refused r),
         (select array_agg(r.holder order by r.n) from refused r),
         (select coalesce(jsonb_agg(distinct jsonb_build_object('run_id', run_id,
                                                                'current', current,
                                                                'holder', holder)),
                          '[]'::jsonb) from refused),
         (select max(h) from unnest(p_hlc) h)
    into v_entry_pos, v_sibling_pos, v_drop, v_ref_n, v_ref_run, v_ref_current, v_ref_holder,
         v_fenced, v_max_hlc
  from x left join numbered nb on nb.n = x.n left join candidates c on c.n = x.n;

  if v_ref_n is not null then
    -- exactly the refusals decided above (leases are not read again: one taken
    -- meanwhile must not mark a merged entry as refused), with the bytes kept
    insert into fenced (tenant, origin, lsn, key, run_id, fence, current, holder, data)
    select v_tenant, p_node, u.lsn, u.key, r.run_id, coalesce(u.fence, 0), r.current,
           r.holder, u.data
    from unnest(v_ref_n, v_ref_run, v_ref_current, v_ref_holder)
           as r(n, run_id, current, holder)
    join unnest(p_lsn, p_key, p_fence, p_data) with ordinality as u(lsn, key, fence, data, n)
      on u.n = r.n
    on conflict do nothing;
  end if;
  if v_drop is not null then
    -- planned for its tids each time: a cached plan made while the table was small
    -- could scan all of it
    perform set_config('plan_cache_mode', 'force_custom_plan', true);
    delete from siblings where tenant = v_tenant and ctid = any (v_drop);
  end if;
  -- The wide columns, streamed from the arguments into the tables: one plan for
  -- every call (no join, nothing to estimate), never a copy of the arrays.
  perform set_config('plan_cache_mode', 'force_generic_plan', true);
  if v_n > 0 then
    insert into entries (tenant, pos, origin, lsn, idx, key, deleted, data, codec, vv, hlc,
                         fence, value_hash)
    select v_tenant, v_entry_pos[u.n], p_node, u.lsn, u.idx, u.key, u.deleted, u.data, u.codec, u.vv,
           u.hlc, coalesce(u.fence, 0), u.value_hash
    from unnest(p_lsn, p_idx, p_key, p_deleted, p_data, p_codec, p_vv, p_hlc, p_fence,
                p_value_hash) with ordinality
         as u(lsn, idx, key, deleted, data, codec, vv, hlc, fence, value_hash, n)
    where v_entry_pos[u.n] > 0;
    get diagnostics v_inserted = row_count;
    insert into siblings (tenant, key, origin, lsn, deleted, data, codec, vv, hlc, fence,
                          value_hash, value_json, pos)
    select v_tenant, u.key, p_node, u.lsn, u.deleted, u.data, u.codec, u.vv, u.hlc, coalesce(u.fence, 0),
           u.value_hash, u.value_json::jsonb, v_sibling_pos[u.n]
    from unnest(p_lsn, p_key, p_deleted, p_data, p_codec, p_vv, p_hlc, p_fence, p_value_hash,
                p_value_json) with ordinality
         as u(lsn, key, deleted, data, codec, vv, hlc, fence, value_hash, value_json, n)
    where v_sibling_pos[u.n] > 0;
    get diagnostics v_merged = row_count;
  end if;

  update head set pos = v_head + v_inserted where tenant = v_tenant;
  update nodes
     set acked_lsn = greatest(acked_lsn, coalesce(p_through_lsn, 0)),
         acked_hlc = greatest(acked_hlc, coalesce(v_max_hlc, 0)),
         last_push_at = now()
   where tenant = v_tenant and node_id = p_node
  returning acked_lsn into v_acked;
  return jsonb_build_object('acked_lsn', v_acked, 'inserted', v_inserted,
                            'merged', v_merged, 'head', v_head + v_inserted,
                            'fenced', v_fenced);
end
$$;

-- lease_acquire: a new holder's token is above every token the run's record was
-- written with on this server (its run and index keys' siblings), not only
-- above the lease row's. Without a row, or with a row older than the run's
-- data (a database restored from a backup, or filled again by re-shipping),
-- tokens would otherwise start again below the ones hosts already wrote
-- with. A holder taking its own lease again keeps its token, as before.
create or replace function walsync_api.lease_acquire(p_run_id text, p_holder text,
                                                     p_ttl_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  l leases%rowtype;
  v_missing boolean;
  v_floor   bigint;
begin
  if p_ttl_seconds is null or p_ttl_seconds <= 0 then
    raise exception 'lease TTL must be positive' using errcode = '22023';
  end if;
  select * into l from leases where tenant = v_tenant and run_id = p_run_id for update;
  v_missing := not found;
  if v_missing or (l.holder <> p_holder and l.expires_at <= now()) then
    select coalesce(max(s.fence), 0) into v_floor from siblings s
     where s.tenant = v_tenant
       and s.key in ('runs/' || p_run_id, 'index/runs/' || p_run_id);
  end if;
  if v_missing then
    insert into leases (tenant, run_id, holder, token, expires_at)
    values (v_tenant, p_run_id, p_holder, v_floor + 1,
            now() + make_interval(secs => p_ttl_seconds))
    returning * into l;
    return jsonb_build_object('acquired', true, 'run_id', p_run_id, 'holder', l.holder,
                              'token', l.token, 'expires_at', l.expires_at, 'now', now());
  end if;
  if l.holder = p_holder or l.expires_at <= now() then
    update leases
       set holder = p_holder,
           token = case when l.holder = p_holder then l.token
                        else greatest(l.token, v_floor) + 1 end,
           expires_at = now() + make_interval(secs => p_ttl_seconds),
           acquired_at = case when l.holder = p_holder then l.acquired_at else now() end
     where tenant = v_tenant and run_id = p_run_id
    returning * into l;
    return jsonb_build_object('acquired', true, 'run_id', p_run_id, 'holder', l.holder,
                              'token', l.token, 'expires_at', l.expires_at, 'now', now());
  end if;
  return jsonb_build_object('acquired', false, 'run_id', p_run_id, 'holder', l.holder,
                            'token', l.token, 'expires_at', l.expires_at, 'now', now());
end
$$;
