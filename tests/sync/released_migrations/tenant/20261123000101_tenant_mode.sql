-- walsync tenant mode (optional): every row belongs to a tenant, named by a
-- claim of the caller's JWT, and a tenant-scoped key (role authenticated with
-- that claim) reads and writes only its own tenant's rows through the same
-- walsync_api functions. Applied by `walsync migrate --tenant-mode`, never by
-- a plain `walsync migrate`; applied after the default files (and again after
-- any of them is re-applied, since they re-create the functions below).
--
-- Two layers keep tenants apart, so that a single mistake cannot leak:
--  1. every query of every tenant-mode function filters on the caller's
--     tenant (walsync.require_tenant(), computed once per call);
--  2. those functions are SECURITY DEFINER owned by walsync_tenant_api, a role
--     that is neither a superuser, nor BYPASSRLS, nor the tables' owner: Row
--     Level Security applies to their queries, and its policies admit only
--     the caller's tenant's rows.
-- Callers that may already read every row directly (superusers, BYPASSRLS
-- roles such as service_role, the tables' owner) act on the default tenant ''
-- unless their JWT carries the claim, so existing workers keep working and the
-- rows held before tenant mode stay theirs.
-- Plain SQL, no psql meta-commands (usable with the Supabase CLI).
-- Safe to apply more than once.

do $$
begin
  if not exists (select from pg_roles where rolname = 'walsync_tenant_api') then
    create role walsync_tenant_api nologin noinherit nobypassrls;
  end if;
  -- ALTER ... OWNER TO needs the migrating role to be able to become the new owner
  if not pg_has_role(current_user, 'walsync_tenant_api', 'MEMBER') then
    execute format('grant walsync_tenant_api to %I', current_user);
  end if;
end
$$;

-- Which JWT claim names the tenant (`walsync migrate --tenant-claim NAME`).
create table if not exists walsync.tenant_settings (
  id    smallint primary key default 1 check (id = 1),
  claim text not null default 'tenant_id' check (claim <> '')
);
insert into walsync.tenant_settings (id) values (1) on conflict do nothing;
alter table walsync.tenant_settings enable row level security;
revoke all on walsync.tenant_settings from public, anon, authenticated;

-- The caller's tenant: the claim's value when the request's JWT claims carry it
-- as a non-empty string (whatever the role); else '' (the default tenant) for
-- a caller that can read every row directly anyway; else null (nothing).
-- Inside a SECURITY DEFINER function current_user is the owner, but the "role"
-- setting still names the caller's SET ROLE (PostgREST's role from the JWT).
create or replace function walsync.request_tenant() returns text
language plpgsql stable security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_claims jsonb := nullif(current_setting('request.jwt.claims', true), '')::jsonb;
  v_value  jsonb;
  v_role   text := current_setting('role');
begin
  select v_claims -> s.claim into v_value from tenant_settings s where s.id = 1;
  if jsonb_typeof(v_value) = 'string' and v_value #>> '{}' <> '' then
    return v_value #>> '{}';
  end if;
  if v_role = 'none' then
    v_role := session_user;
  end if;
  if exists (select from pg_roles r where r.rolname = v_role and (r.rolsuper or r.rolbypassrls))
     or exists (select from pg_class c join pg_roles r on r.oid = c.relowner
                where c.oid = 'walsync.entries'::regclass and r.rolname = v_role) then
    return '';
  end if;
  return null;
end
$$;

-- The caller's tenant, or a refusal (SQLSTATE 42501: PostgREST answers 403).
create or replace function walsync.require_tenant() returns text
language plpgsql stable security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.request_tenant();
begin
  if v_tenant is null then
    raise exception 'tenant mode: the request''s JWT carries no "%" claim',
                    (select claim from tenant_settings where id = 1)
      using errcode = '42501',
            hint = 'use a tenant-scoped key: a JWT with that claim naming the tenant';
  end if;
  return v_tenant;
end
$$;

-- The tenant column ('' for the rows held before tenant mode), then keys that
-- lead with it: two tenants may use the same keys, node ids and run ids.
do $$
declare
  t record;
begin
  for t in select * from (values
      ('nodes', 'tenant, node_id'),
      ('head', 'tenant'),
      ('entries', 'tenant, origin, lsn, key'),
      ('siblings', 'tenant, key, origin, lsn'),
      ('leases', 'tenant, run_id'),
      ('fenced', 'tenant, origin, lsn, key')) as v(tbl, pkey)
  loop
    execute format('alter table walsync.%I add column if not exists tenant text not null '
                   'default %L', t.tbl, '');
    execute format('alter table walsync.%I alter column tenant set default '
                   'walsync.request_tenant()', t.tbl);
    if not exists (
        select from pg_constraint c
        join pg_attribute a on a.attrelid = c.conrelid and a.attnum = any (c.conkey)
        where c.conrelid = format('walsync.%I', t.tbl)::regclass and c.contype = 'p'
          and a.attname = 'tenant') then
      execute (select format('alter table walsync.%I drop constraint %I', t.tbl, c.conname)
               from pg_constraint c
               where c.conrelid = format('walsync.%I', t.tbl)::regclass and c.contype = 'p');
      execute format('alter table walsync.%I add constraint %I primary key (%s)',
                     t.tbl, t.tbl || '_pkey', t.pkey);
    end if;
  end loop;
  -- one head row per tenant: positions are counted per tenant
  alter table walsync.head drop constraint if exists head_id_check;
  alter table walsync.head alter column id set default 1;
  -- same name as the default file's index, so re-applying that file keeps this one
  if not exists (
      select from pg_index i
      join pg_attribute a on a.attrelid = i.indrelid and a.attnum = any (i.indkey)
      where i.indexrelid = 'walsync.entries_pos'::regclass and a.attname = 'tenant') then
    drop index walsync.entries_pos;
    create unique index entries_pos on walsync.entries (tenant, pos);
  end if;
end
$$;

-- Row Level Security keyed on the caller's tenant, for the tenant-mode
-- functions' owner and for authenticated (which holds no table privilege:
-- the policy is what a stray GRANT would still meet).
do $$
declare
  t text;
begin
  foreach t in array array['nodes', 'head', 'entries', 'siblings', 'leases', 'fenced'] loop
    execute format('alter table walsync.%I enable row level security', t);
    execute format('drop policy if exists walsync_tenant on walsync.%I', t);
    execute format('create policy walsync_tenant on walsync.%I for all '
                   'to authenticated, walsync_tenant_api '
                   'using (tenant = (select walsync.request_tenant())) '
                   'with check (tenant = (select walsync.request_tenant()))', t);
  end loop;
end
$$;

-- The views keep their columns (the default file re-creates them) but rank
-- each tenant's siblings apart; tenant_state_json shows which tenant is whose.
create or replace view walsync.state with (security_invoker = true) as
  select distinct on (tenant, key) key, deleted, data, codec, vv, hlc, origin, lsn, fence,
         value_hash, value_json, pos
  from walsync.siblings
  order by tenant, key, fence desc, hlc desc, origin collate "C" desc, lsn desc;

create or replace view walsync.conflicts with (security_invoker = true) as
  select key, count(distinct (deleted, coalesce(value_hash, ''))) as versions
  from walsync.siblings
  group by tenant, key
  having count(distinct (deleted, coalesce(value_hash, ''))) > 1;

create or replace view walsync.tenant_state_json with (security_invoker = true) as
  select tenant, key, value_json as value, origin, lsn, hlc, fence,
         to_timestamp((hlc >> 16) / 1000.0) as written_at
  from (select distinct on (tenant, key) *
        from walsync.siblings
        order by tenant, key, fence desc, hlc desc, origin collate "C" desc, lsn desc) w
  where not deleted;

revoke all on all tables in schema walsync from public, anon, authenticated;

-- The tenant-mode twins of every walsync_api function: same signatures and
-- results, each query confined to walsync.require_tenant()'s rows.

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
  v_ref_n       bigint[];  -- ordinals, runs and current tokens of the refused entries
  v_ref_run     text[];
  v_ref_current bigint[];
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
    select u.n, u.lsn, u.idx, u.key, coalesce(u.fence, 0) as fence, u.vv
    from unnest(p_lsn, p_idx, p_key, p_fence, p_vv) with ordinality
         as u(lsn, idx, key, fence, vv, n)
  ),
  -- Fencing: an entry for a run's keys carrying an older token than the
  -- run's current lease is refused (recorded below), never merged.
  refused as materialized (
    select x.n, x.lsn, x.key, l.run_id, x.fence, l.token as current, l.holder
    from x join leases l on l.tenant = v_tenant and l.run_id = walsync.run_of(x.key)
    where x.fence < l.token
  ),
  -- An entry sent twice in one batch counts once (distinct on its identity).
  incoming as (
    select distinct on (x.lsn, x.key) x.* from x
    where not exists (select 1 from entries e
                      where e.tenant = v_tenant and e.origin = p_node and e.lsn = x.lsn
                        and e.key = x.key and e.lsn between v_min and v_max)
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
         (select coalesce(jsonb_agg(distinct jsonb_build_object('run_id', run_id,
                                                                'current', current,
                                                                'holder', holder)),
                          '[]'::jsonb) from refused),
         (select max(h) from unnest(p_hlc) h)
    into v_entry_pos, v_sibling_pos, v_drop, v_ref_n, v_ref_run, v_ref_current, v_fenced,
         v_max_hlc
  from x left join numbered nb on nb.n = x.n left join candidates c on c.n = x.n;

  if v_ref_n is not null then
    -- exactly the refusals decided above (leases are not read again: one taken
    -- meanwhile must not mark a merged entry as refused), with the bytes kept
    insert into fenced (tenant, origin, lsn, key, run_id, fence, current, data)
    select v_tenant, p_node, u.lsn, u.key, r.run_id, coalesce(u.fence, 0), r.current, u.data
    from unnest(v_ref_n, v_ref_run, v_ref_current) as r(n, run_id, current)
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

-- The JSON form of push is the default file's: it calls the push above.

create or replace function walsync_api.pull(p_node text, p_after bigint, p_limit integer)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  v_upper  bigint;
  v_head   bigint;
  v_last   record;
  v_out    jsonb;
begin
  -- a tenant that never pushed has no head row: its head is 0 (never "no limit")
  v_head := coalesce((select pos from head where tenant = v_tenant), 0);
  v_upper := least(v_head, p_after + greatest(p_limit, 1));
  select origin, lsn into v_last from entries where tenant = v_tenant and pos = v_upper;
  if found then
    select greatest(v_upper, max(pos)) into v_upper
    from entries where tenant = v_tenant and origin = v_last.origin and lsn = v_last.lsn;
  end if;
  select coalesce(jsonb_agg(jsonb_build_object(
           'pos', e.pos, 'origin', e.origin, 'lsn', e.lsn, 'idx', e.idx, 'key', e.key,
           'deleted', e.deleted, 'data', translate(encode(e.data, 'base64'), E'\n', ''),
           'codec', e.codec, 'vv', e.vv, 'hlc', e.hlc, 'fence', e.fence,
           'value_hash', e.value_hash) order by e.pos), '[]'::jsonb)
    into v_out
  from entries e
  where e.tenant = v_tenant and e.pos > p_after and e.pos <= v_upper and e.origin <> p_node;
  insert into nodes (tenant, node_id, pull_cursor, last_pull_at)
  values (v_tenant, p_node, p_after, now())
  on conflict (tenant, node_id) do update
    set pull_cursor = greatest(nodes.pull_cursor, excluded.pull_cursor), last_pull_at = now();
  return jsonb_build_object('entries', v_out, 'next', greatest(v_upper, p_after),
                            'head', v_head);
end
$$;

create or replace function walsync_api.node_status(p_node text)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return coalesce(
    (select jsonb_build_object('node_id', node_id, 'acked_lsn', acked_lsn,
                               'acked_hlc', acked_hlc, 'pull_cursor', pull_cursor,
                               'last_push_at', last_push_at, 'last_pull_at', last_pull_at)
     from nodes where tenant = v_tenant and node_id = p_node),
    jsonb_build_object('node_id', p_node, 'acked_lsn', 0, 'acked_hlc', 0, 'pull_cursor', 0));
end
$$;

create or replace function walsync_api.head()
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return jsonb_build_object('head', coalesce((select pos from head where tenant = v_tenant), 0),
                            'schema_version', 1);
end
$$;

create or replace function walsync_api.conflicts(p_prefix text, p_limit integer)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return (
    select coalesce(jsonb_agg(jsonb_build_object('key', c.key, 'versions', c.versions)
                              order by c.key), '[]'::jsonb)
    from (select s.key, count(distinct (s.deleted, coalesce(s.value_hash, ''))) as versions
          from siblings s
          where s.tenant = v_tenant
            and s.key like replace(replace(replace(p_prefix, '\', '\\'), '%', '\%'), '_', '\_')
                           || '%'
          group by s.key
          having count(distinct (s.deleted, coalesce(s.value_hash, ''))) > 1
          order by s.key limit p_limit) c);
end
$$;

create or replace function walsync_api.lease_acquire(p_run_id text, p_holder text,
                                                     p_ttl_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  l leases%rowtype;
begin
  if p_ttl_seconds is null or p_ttl_seconds <= 0 then
    raise exception 'lease TTL must be positive' using errcode = '22023';
  end if;
  select * into l from leases where tenant = v_tenant and run_id = p_run_id for update;
  if not found then
    insert into leases (tenant, run_id, holder, token, expires_at)
    values (v_tenant, p_run_id, p_holder, 1, now() + make_interval(secs => p_ttl_seconds))
    returning * into l;
    return jsonb_build_object('acquired', true, 'run_id', p_run_id, 'holder', l.holder,
                              'token', l.token, 'expires_at', l.expires_at, 'now', now());
  end if;
  if l.holder = p_holder or l.expires_at <= now() then
    update leases
       set holder = p_holder,
           token = case when l.holder = p_holder then l.token else l.token + 1 end,
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

create or replace function walsync_api.lease_renew(p_run_id text, p_holder text, p_token bigint,
                                                   p_ttl_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  l leases%rowtype;
begin
  update leases set expires_at = now() + make_interval(secs => p_ttl_seconds)
   where tenant = v_tenant and run_id = p_run_id and holder = p_holder and token = p_token
  returning * into l;
  if found then
    return jsonb_build_object('renewed', true, 'token', l.token, 'expires_at', l.expires_at);
  end if;
  select * into l from leases where tenant = v_tenant and run_id = p_run_id;
  return jsonb_build_object('renewed', false, 'holder', l.holder, 'token', l.token,
                            'expires_at', l.expires_at);
end
$$;

create or replace function walsync_api.lease_release(p_run_id text, p_holder text,
                                                     p_token bigint)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  update leases set expires_at = now()
   where tenant = v_tenant and run_id = p_run_id and holder = p_holder and token = p_token;
  return jsonb_build_object('released', found);
end
$$;

create or replace function walsync_api.leases(p_holder text)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return (
    select coalesce(jsonb_agg(jsonb_build_object(
             'run_id', run_id, 'holder', holder, 'token', token, 'expires_at', expires_at,
             'live', expires_at > now()) order by run_id), '[]'::jsonb)
    from leases where tenant = v_tenant and (p_holder is null or holder = p_holder));
end
$$;

create or replace function walsync_api.state_page(p_prefix text, p_after_key text,
                                                  p_limit integer)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return (
    with page as (
      select distinct key collate "C" as key
      from siblings
      where tenant = v_tenant
        and key collate "C" >= coalesce(p_prefix, '')
        and starts_with(key, coalesce(p_prefix, ''))
        and (p_after_key is null or key collate "C" > p_after_key collate "C")
      order by 1
      limit greatest(p_limit, 1)
    )
    select jsonb_build_object(
      'rows', coalesce((
        select jsonb_agg(jsonb_build_object(
                 'key', s.key, 'origin', s.origin, 'lsn', s.lsn, 'deleted', s.deleted,
                 'data', translate(encode(s.data, 'base64'), E'\n', ''), 'codec', s.codec,
                 'vv', s.vv, 'hlc', s.hlc, 'fence', s.fence, 'value_hash', s.value_hash)
               order by s.key collate "C", s.origin collate "C", s.lsn)
        from siblings s join page p on s.key = p.key
        where s.tenant = v_tenant), '[]'::jsonb),
      'last_key', (select max(key collate "C") from page),
      'done', (select count(*) from page) < greatest(p_limit, 1)));
end
$$;

create or replace function walsync_api.state_count(p_prefix text)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return (
    select jsonb_build_object('keys', count(distinct key),
                              'bytes', coalesce(sum(length(data)), 0))
    from siblings where tenant = v_tenant and starts_with(key, coalesce(p_prefix, '')));
end
$$;

-- Every tenant with its head, nodes and keys: for the service role alone,
-- owned by the tables' owner (it reads across tenants).
create or replace function walsync_api.tenants()
returns jsonb
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  select coalesce(jsonb_agg(jsonb_build_object(
           'tenant', t.tenant,
           'head', coalesce((select h.pos from head h where h.tenant = t.tenant), 0),
           'nodes', (select count(*) from nodes n where n.tenant = t.tenant),
           'keys', (select count(distinct s.key) from siblings s where s.tenant = t.tenant))
           order by t.tenant), '[]'::jsonb)
  from (select tenant from head union select tenant from nodes
        union select tenant from leases) t
$$;

-- What the tenant-mode functions' owner may touch (RLS still narrows it).
grant usage on schema walsync to walsync_tenant_api;
grant usage, create on schema walsync_api to walsync_tenant_api;
grant select, insert, update, delete
  on walsync.nodes, walsync.head, walsync.entries, walsync.siblings, walsync.leases,
     walsync.fenced
  to walsync_tenant_api;
revoke all on all functions in schema walsync from public, anon, authenticated;
grant execute on function walsync.request_tenant(), walsync.require_tenant(),
                          walsync.run_of(text), walsync.vv_leq(jsonb, jsonb)
  to walsync_tenant_api;
-- the policies call it as the querying role
grant execute on function walsync.request_tenant() to authenticated;

-- The twins above, by signature: owned by walsync_tenant_api (so RLS applies to
-- them) and callable by tenant-scoped keys. A function this list does not
-- name (say, one a later default file adds) stays the service role's alone.
do $$
declare
  f text;
begin
  foreach f in array array[
    'walsync_api.push(text, bigint, bigint[], integer[], text[], boolean[], bytea[], '
      'smallint[], jsonb[], bigint[], bigint[], text[], text[])',
    'walsync_api.push(text, bigint, jsonb)',
    'walsync_api.pull(text, bigint, integer)',
    'walsync_api.node_status(text)',
    'walsync_api.head()',
    'walsync_api.conflicts(text, integer)',
    'walsync_api.lease_acquire(text, text, double precision)',
    'walsync_api.lease_renew(text, text, bigint, double precision)',
    'walsync_api.lease_release(text, text, bigint)',
    'walsync_api.leases(text)',
    'walsync_api.state_page(text, text, integer)',
    'walsync_api.state_count(text)']
  loop
    execute format('alter function %s owner to walsync_tenant_api', f);
    execute format('revoke all on function %s from public, anon', f);
    execute format('grant execute on function %s to authenticated, service_role', f);
  end loop;
end
$$;

revoke all on function walsync_api.tenants() from public, anon, authenticated;
grant execute on function walsync_api.tenants() to service_role;
grant usage on schema walsync_api to authenticated, service_role;
