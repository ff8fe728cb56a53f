-- walsync server schema: one definition of every function and view.
--
-- Before this file, tenant mode re-created every API function as a tenant-scoped
-- twin (migrations/tenant/), so each protocol change was written twice and a
-- default file applied after tenant mode undid it. Now every table has a
-- tenant column that every key and unique index includes, and each function
-- below filters on the caller's tenant, always: walsync.request_tenant() is ''
-- while tenant mode is off (a single-tenant database: every row has tenant ''),
-- and the tenant a JWT claim names once the tenant file turned it on (its row
-- in walsync.tenant_settings). The tenant file adds no function: the setting,
-- keys that lead with the tenant, Row Level Security policies, grants and the
-- functions' owner.
--
-- This file holds the live definition of every function and view of both
-- schemas; the definitions in the files before it are superseded here (same
-- signatures: CREATE OR REPLACE keeps each function's owner and grants). A
-- later change re-creates the function it changes in a new file, once. The
-- functions keep their signatures and results.
--
-- Brings a database at any earlier level here: the default files alone, or
-- with the tenant files released before this one (whose tenant columns, keys,
-- settings and policies this file keeps). A primary key that does not yet hold
-- the tenant is rebuilt once (the table is locked meanwhile). Plain SQL. Safe
-- to apply more than once.

-- Tenant mode's setting: its row (inserted by the tenant file) turns tenant
-- mode on and names the JWT claim (`walsync migrate --tenant-claim NAME`).
create table if not exists walsync.tenant_settings (
  id    smallint primary key default 1 check (id = 1),
  claim text not null default 'tenant_id' check (claim <> '')
);
alter table walsync.tenant_settings enable row level security;
revoke all on walsync.tenant_settings from public, anon, authenticated;

-- The caller's tenant. Tenant mode off: '' for everyone. On: the claim's value
-- when the request's JWT claims carry it as a non-empty string (whatever the
-- role); else '' (the default tenant) for a caller that can read every row
-- directly anyway; else null (nothing). Inside a SECURITY DEFINER function
-- current_user is the owner, but the "role" setting still names the caller's
-- SET ROLE (PostgREST's role from the JWT).
create or replace function walsync.request_tenant() returns text
language plpgsql stable security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_claim text;
  v_value jsonb;
  v_role  text;
begin
  select s.claim into v_claim from tenant_settings s where s.id = 1;
  if v_claim is null then
    return '';
  end if;
  v_value := nullif(current_setting('request.jwt.claims', true), '')::jsonb -> v_claim;
  if jsonb_typeof(v_value) = 'string' and v_value #>> '{}' <> '' then
    return v_value #>> '{}';
  end if;
  v_role := current_setting('role');
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

-- Where the tenant column stands in each table's key. In a single-tenant
-- database it closes the key: it never differs, so an index insert or probe
-- never compares it (leading, it would be compared at every step of every
-- descent: a few percent of each push). Tenant mode (its file calls this with
-- p_leading) leads each key with it, so that a tenant's rows are adjacent and
-- its pulls, state pages and conflict listings read none of another's. Either
-- way two tenants may use the same keys, node ids and run ids. A key already in
-- the wanted form is left alone; another is rebuilt (the table is locked while
-- its index is built).
create or replace function walsync.tenant_keys(p_leading boolean) returns void
language plpgsql
set search_path = pg_catalog, walsync
as $$
declare
  t      record;
  v_cols text;
  v_name text;
  v_def  text;
begin
  for t in select * from (values
      ('nodes', 'node_id'), ('head', null), ('entries', 'origin, lsn, key'),
      ('siblings', 'key, origin, lsn'), ('leases', 'run_id'), ('fenced', 'origin, lsn, key'))
      as v(tbl, cols)
  loop
    v_cols := case when t.cols is null then 'tenant'
                   when p_leading then 'tenant, ' || t.cols
                   else t.cols || ', tenant' end;
    v_name := null;
    v_def := null;
    select c.conname, pg_get_constraintdef(c.oid) into v_name, v_def from pg_constraint c
     where c.conrelid = format('walsync.%I', t.tbl)::regclass and c.contype = 'p';
    if v_def is distinct from format('PRIMARY KEY (%s)', v_cols) then
      if v_name is not null then
        execute format('alter table walsync.%I drop constraint %I', t.tbl, v_name);
      end if;
      execute format('alter table walsync.%I add constraint %I primary key (%s)',
                     t.tbl, t.tbl || '_pkey', v_cols);
    end if;
  end loop;
end
$$;

-- The tenant column ('' for every row of a single-tenant database; the tenant
-- file makes a direct insert default to the caller's tenant) and the keys that
-- hold it.
do $$
declare
  t text;
begin
  foreach t in array array['nodes', 'head', 'entries', 'siblings', 'leases', 'fenced'] loop
    execute format('alter table walsync.%I add column if not exists tenant text not null '
                   'default %L', t, '');
    execute format('alter table walsync.%I alter column tenant set default %L', t, '');
  end loop;
  -- a database already in tenant mode (from an earlier release) keeps its keys
  perform walsync.tenant_keys(exists (select from walsync.tenant_settings));
  -- one head row per tenant: positions are counted per tenant
  alter table walsync.head drop constraint if exists head_id_check;
  alter table walsync.head alter column id set default 1;
  -- Positions are per tenant, so this index leads with it in either mode (a pull
  -- reads one tenant's range; positions only grow, so an insert lands at the
  -- end of the index). The same name as the first file's index, so re-applying
  -- that file keeps this one.
  if to_regclass('walsync.entries_pos') is null
     or pg_get_indexdef('walsync.entries_pos'::regclass) not like '%(tenant, pos)' then
    drop index if exists walsync.entries_pos;
    create unique index entries_pos on walsync.entries (tenant, pos);
  end if;
end
$$;

-- The run a key belongs to, or null: .walsync/runs/<id>, anything under it, or
-- .walsync/index/runs/<id> (walsync's reserved namespace: engine/FORMAT.md,
-- "Keys"), or the same in the legacy spelling an older walsync wrote (runs/<id>,
-- runs/<id>/..., index/runs/<id>), so that a host not yet upgraded stays fenced
-- (sync/PROTOCOL.md, "Leases and fencing"). Its Python twin is
-- walsync.engine.workflow.keys.run_of (tests/workflow/test_keys_sql.py).
create or replace function walsync.run_of(p_key text) returns text
language sql immutable parallel safe
as $$
  select case
    when pg_catalog.left(p_key, 14) = '.walsync/runs/'
      then pg_catalog.split_part(pg_catalog.substr(p_key, 15), '/', 1)
    when pg_catalog.left(p_key, 20) = '.walsync/index/runs/'
      then pg_catalog.split_part(pg_catalog.substr(p_key, 21), '/', 1)
    when p_key like 'runs/%' then pg_catalog.split_part(pg_catalog.substr(p_key, 6), '/', 1)
    when p_key like 'index/runs/%' then pg_catalog.split_part(pg_catalog.substr(p_key, 12), '/', 1)
  end
$$;

-- a ≤ b for version vectors (missing components are 0), for ad-hoc queries.
-- Its subquery keeps the planner from inlining it: every call goes through
-- the SQL-function executor (about twice the cost of the test written out),
-- so push spells the test out instead. It names only pg_catalog objects; its
-- callers pin search_path themselves.
create or replace function walsync.vv_leq(a jsonb, b jsonb) returns boolean
language sql immutable parallel safe
as $$
  select not exists (
    select 1 from pg_catalog.jsonb_each_text(a) e
    where e.value::bigint > coalesce((b ->> e.key)::bigint, 0)
  )
$$;

-- The winner of each key of each tenant: highest fence, then HLC, then origin
-- (byte order), then LSN.
create or replace view walsync.state with (security_invoker = true) as
  select distinct on (tenant, key) key, deleted, data, codec, vv, hlc, origin, lsn, fence,
         value_hash, value_json, pos
  from walsync.siblings
  order by tenant, key, fence desc, hlc desc, origin collate "C" desc, lsn desc;

-- What a person reads in the table editor: live keys, values as JSON where
-- the value is JSON-representable (else null; the bytes are in "state").
create or replace view walsync.state_json with (security_invoker = true) as
  select key, value_json as value, origin, lsn, hlc, fence,
         to_timestamp((hlc >> 16) / 1000.0) as written_at
  from walsync.state where not deleted;

-- Keys whose visible siblings disagree (identical values count once).
create or replace view walsync.conflicts with (security_invoker = true) as
  select key, count(distinct (deleted, coalesce(value_hash, ''))) as versions
  from walsync.siblings
  group by tenant, key
  having count(distinct (deleted, coalesce(value_hash, ''))) > 1;

-- state_json with the tenant: which tenant's value is whose.
create or replace view walsync.tenant_state_json with (security_invoker = true) as
  select tenant, key, value_json as value, origin, lsn, hlc, fence,
         to_timestamp((hlc >> 16) / 1000.0) as written_at
  from (select distinct on (tenant, key) *
        from walsync.siblings
        order by tenant, key, fence desc, hlc desc, origin collate "C" desc, lsn desc) w
  where not deleted;

revoke all on all tables in schema walsync from public, anon, authenticated;

-- push: one transaction per batch, the batch as parallel arrays (element i of
-- every array is entry i). Idempotent by (origin, lsn, key): a re-sent batch
-- inserts nothing and returns the same acknowledgement.
--
-- Fencing checks the holder, not only the token: a leased run's entries are
-- accepted only from the lease's holder (the pushing node: pulled entries are
-- never pushed back, so the pusher is the writer) carrying the lease's current
-- token; anything else is refused (kept in walsync.fenced with the lease's
-- holder, listed per run in the result's "fenced"), never merged. A run with no
-- lease row is no one's: its entries merge like any key's, whatever token they
-- carry. An entry already stored (a re-sent batch) is a duplicate, skipped:
-- never refused after the fact, never in both tables.
--
-- The work is laid out to cost the server little: only the narrow columns
-- (identity, order, fence, version vector) go through the planner as one
-- statement, which decides everything and returns it as arrays indexed by an
-- entry's ordinal; the wide columns (bytes, JSON views) are then streamed from
-- the arguments by two plain inserts with a cached generic plan.
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
  -- Pushers take a transaction-scoped lock before drawing positions, so positions
  -- are handed out in commit order and a puller reading "pos > cursor" can never
  -- skip a row that commits later with a smaller one. Positions are per tenant:
  -- tenants push without waiting for each other.
  perform pg_advisory_xact_lock(hashtext('walsync.push'), hashtext(v_tenant));
  insert into nodes (tenant, node_id) values (v_tenant, p_node) on conflict do nothing;
  select pos into v_head from head where tenant = v_tenant for update;
  if not found then  -- a tenant's first push
    insert into head (tenant, pos) values (v_tenant, 0) on conflict do nothing;
    select pos into v_head from head where tenant = v_tenant for update;
  end if;
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
    -- could scan all of it. The tids are this tenant's rows, read above under its
    -- push lock (no other push moves them): a tenant filter here would only make a
    -- scan read every row's last column.
    perform set_config('plan_cache_mode', 'force_custom_plan', true);
    delete from siblings where ctid = any (v_drop);
  end if;
  -- The wide columns, streamed from the arguments into the tables: one plan for
  -- every call (no join, nothing to estimate), never a copy of the arrays.
  perform set_config('plan_cache_mode', 'force_generic_plan', true);
  if v_n > 0 then
    insert into entries (tenant, pos, origin, lsn, idx, key, deleted, data, codec, vv, hlc,
                         fence, value_hash)
    select v_tenant, v_entry_pos[u.n], p_node, u.lsn, u.idx, u.key, u.deleted, u.data,
           u.codec, u.vv, u.hlc, coalesce(u.fence, 0), u.value_hash
    from unnest(p_lsn, p_idx, p_key, p_deleted, p_data, p_codec, p_vv, p_hlc, p_fence,
                p_value_hash) with ordinality
         as u(lsn, idx, key, deleted, data, codec, vv, hlc, fence, value_hash, n)
    where v_entry_pos[u.n] > 0;
    get diagnostics v_inserted = row_count;
    insert into siblings (tenant, key, origin, lsn, deleted, data, codec, vv, hlc, fence,
                          value_hash, value_json, pos)
    select v_tenant, u.key, p_node, u.lsn, u.deleted, u.data, u.codec, u.vv, u.hlc,
           coalesce(u.fence, 0), u.value_hash, u.value_json::jsonb, v_sibling_pos[u.n]
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

-- push with the batch as one JSON array of wire entries (data in base64), for
-- hand-made calls: unpacked into the arrays above, merged by the same push.
create or replace function walsync_api.push(p_node text, p_through_lsn bigint, p_entries jsonb)
returns jsonb
language sql security definer
set search_path = pg_catalog, walsync
as $$
  select walsync_api.push(
    p_node, p_through_lsn,
    array_agg(e.lsn order by e.n), array_agg(e.idx order by e.n), array_agg(e.key order by e.n),
    array_agg(e.deleted order by e.n), array_agg(decode(e.data, 'base64') order by e.n),
    array_agg(e.codec order by e.n), array_agg(e.vv order by e.n), array_agg(e.hlc order by e.n),
    array_agg(e.fence order by e.n), array_agg(e.value_hash order by e.n),
    array_agg(e.value_json::text order by e.n))
  from rows from (jsonb_to_recordset(coalesce(p_entries, '[]'::jsonb)) as (
         lsn bigint, idx integer, key text, deleted boolean, data text, codec smallint, vv jsonb,
         hlc bigint, fence bigint, value_hash text, value_json jsonb))
       with ordinality as e(lsn, idx, key, deleted, data, codec, vv, hlc, fence, value_hash,
                            value_json, n)
$$;

-- pull: other origins' entries after a position, as one document, in
-- position order, whole records only: at most about p_limit rows (the last
-- record is completed). "next" is the position to pass next time, past
-- this node's own rows too.
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

-- A node's acknowledged position (the replicator's resume point after it
-- lost its local record of it, and the recovery point of a lost host).
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

-- The keys under a prefix whose siblings are in conflict.
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

-- Take (or renew) the lease on a run. Expiry uses the database's clock, so
-- skewed host clocks cannot make two holders believe they own a run at once.
-- A holder taking its own lease again keeps its token; a new holder's token is
-- above the lease row's and above every token the run's record was written
-- with on this server (its run and index keys' siblings, in both spellings, as
-- run_of; Python twin: walsync.engine.workflow.keys.record_keys): without a row, or
-- with a row older than the run's data (a database restored from a backup, or
-- filled again by re-shipping), tokens would otherwise start again below the
-- ones hosts already wrote with.
create or replace function walsync_api.lease_acquire(p_run_id text, p_holder text,
                                                     p_ttl_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant  text := walsync.require_tenant();
  l         leases%rowtype;
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
       and s.key in ('.walsync/runs/' || p_run_id, '.walsync/index/runs/' || p_run_id,
                     'runs/' || p_run_id, 'index/runs/' || p_run_id);
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

-- Renew a lease held with this token; false when it was lost.
create or replace function walsync_api.lease_renew(p_run_id text, p_holder text, p_token bigint,
                                                   p_ttl_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  l        leases%rowtype;
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

-- The merged state, one page of keys at a time in byte order, every stored
-- sibling included (tombstones too), for restore.
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

-- Claim a node id (p_new_token) or, with p_new_token null, only ask whether the
-- caller still holds it. p_tokens: the tokens the caller claimed the id with,
-- newest first; p_acked_lsn: what the server acknowledged to it for this id;
-- p_base_lsn: LSNs at or below it are not the id's (a renewed id starts above
-- its fork), so the server holds them by construction. reason: null (claimed,
-- or still held), 'taken' (another incarnation holds the id) or 'ahead' (the
-- server holds entries of the id above the caller's acknowledgement: the caller
-- checks whether they are its own before adopting them). Node ids, their
-- incarnations and acknowledgements are per tenant; the server's id is the
-- database's.
create or replace function walsync_api.hello(p_node text, p_tokens jsonb, p_new_token text,
                                             p_acked_lsn bigint, p_base_lsn bigint)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  v_server uuid;
  v_row    nodes%rowtype;
  v_acked  bigint;
  v_reason text;
begin
  if p_node is null or p_node = '' then
    raise exception 'hello needs a node id' using errcode = '22023';
  end if;
  select server_id into v_server from server where id = 1;
  if v_server is null then
    raise exception 'walsync.server has no row: the schema is incomplete'
      using errcode = '42P01', hint = 'run walsync migrate';
  end if;
  if p_new_token is not null then
    insert into nodes (tenant, node_id, acked_lsn)
    values (v_tenant, p_node, greatest(coalesce(p_base_lsn, 0), 0))
    on conflict do nothing;
  end if;
  select * into v_row from nodes where tenant = v_tenant and node_id = p_node for update;
  v_acked := greatest(coalesce(v_row.acked_lsn, 0), coalesce(p_base_lsn, 0));
  if v_row.incarnation is not null
     and not (coalesce(p_tokens, '[]'::jsonb) ? v_row.incarnation) then
    v_reason := 'taken';
  elsif v_acked > coalesce(p_acked_lsn, 0) then
    v_reason := 'ahead';
  elsif p_new_token is not null then
    update nodes set incarnation = p_new_token, claimed_at = now(), acked_lsn = v_acked
     where tenant = v_tenant and node_id = p_node;
  end if;
  return jsonb_build_object(
    'server_id', v_server, 'node_id', p_node, 'reason', v_reason,
    'claimed', v_reason is null and p_new_token is not null,
    'acked_lsn', v_acked, 'acked_hlc', coalesce(v_row.acked_hlc, 0),
    'head', coalesce((select pos from head where tenant = v_tenant), 0));
end
$$;

-- push under a claimed incarnation (p_incarnation; null for LSNs of a node id
-- the caller retired, which only ever re-ships what the server already held of
-- it), following p_after_lsn: refused unless the server holds the node's
-- entries up to there. Otherwise the plain push, with the server's id added.
create or replace function walsync_api.push_claimed(
  p_node text, p_incarnation text, p_base_lsn bigint, p_after_lsn bigint, p_through_lsn bigint,
  p_lsn bigint[], p_idx integer[], p_key text[], p_deleted boolean[], p_data bytea[],
  p_codec smallint[], p_vv jsonb[], p_hlc bigint[], p_fence bigint[], p_value_hash text[],
  p_value_json text[])
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  v_server uuid;
  v_row    nodes%rowtype;
  v_acked  bigint;
  v_reason text;
begin
  if p_node is null or p_node = '' then
    raise exception 'push needs a node id' using errcode = '22023';
  end if;
  select server_id into v_server from server where id = 1;
  insert into nodes (tenant, node_id, acked_lsn)
  values (v_tenant, p_node, greatest(coalesce(p_base_lsn, 0), 0))
  on conflict do nothing;
  -- held to the end: a claim (hello) waits for this push, and this push for it
  select * into v_row from nodes where tenant = v_tenant and node_id = p_node for update;
  v_acked := greatest(v_row.acked_lsn, coalesce(p_base_lsn, 0));
  if p_incarnation is not null and v_row.incarnation is distinct from p_incarnation then
    v_reason := 'taken';
  elsif v_acked < coalesce(p_after_lsn, 0) then
    v_reason := 'behind';
  end if;
  if v_reason is not null then
    return jsonb_build_object('refused', v_reason, 'acked_lsn', v_acked, 'inserted', 0,
                              'merged', 0,
                              'head', coalesce((select pos from head where tenant = v_tenant), 0),
                              'fenced', '[]'::jsonb, 'server_id', v_server);
  end if;
  if v_acked > v_row.acked_lsn then
    update nodes set acked_lsn = v_acked where tenant = v_tenant and node_id = p_node;
  end if;
  if coalesce(cardinality(p_lsn), 0) = 0 then
    -- records with nothing for the server (merges of pulled entries): acknowledged
    update nodes set acked_lsn = greatest(acked_lsn, coalesce(p_through_lsn, 0)),
                     last_push_at = now()
     where tenant = v_tenant and node_id = p_node
    returning acked_lsn into v_acked;
    return jsonb_build_object('acked_lsn', v_acked, 'inserted', 0, 'merged', 0,
                              'head', coalesce((select pos from head where tenant = v_tenant), 0),
                              'fenced', '[]'::jsonb, 'server_id', v_server);
  end if;
  return walsync_api.push(p_node, p_through_lsn, p_lsn, p_idx, p_key, p_deleted, p_data,
                          p_codec, p_vv, p_hlc, p_fence, p_value_hash, p_value_json)
         || jsonb_build_object('server_id', v_server);
end
$$;

-- What the server holds of a node's LSNs in (p_after, p_upto]: per entry its
-- LSN, key, the md5 of its stored bytes (null: a tombstone) and HLC; entries
-- fencing refused count too (HLC null), they were pushed all the same.
create or replace function walsync_api.node_entries(p_node text, p_after bigint, p_upto bigint)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return (
    select jsonb_build_object('rows', coalesce(jsonb_agg(jsonb_build_object(
             'lsn', x.lsn, 'key', x.key, 'md5', x.md5, 'hlc', x.hlc)
             order by x.lsn, x.key collate "C"), '[]'::jsonb))
    from (select e.lsn, e.key, md5(e.data) as md5, e.hlc from entries e
          where e.tenant = v_tenant and e.origin = p_node and e.lsn > p_after
            and e.lsn <= p_upto
          union all
          select f.lsn, f.key, md5(f.data), null from fenced f
          where f.tenant = v_tenant and f.origin = p_node and f.lsn > p_after
            and f.lsn <= p_upto) x);
end
$$;

-- Every tenant with its head, nodes and keys (a single-tenant database: one,
-- ''): for the service role alone, owned by the tables' owner in tenant mode
-- too (it reads across tenants).
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

revoke all on all functions in schema walsync_api from public, anon, authenticated;
revoke all on all functions in schema walsync from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;
