-- walsync server schema, version 1.
-- Tables live in schema "walsync", which PostgREST does not expose; clients
-- call the functions of schema "walsync_api" by RPC. Every function that
-- touches tables is SECURITY DEFINER with a pinned search_path and is
-- executable by service_role only. Row Level Security is on for every table
-- with no policy for anon / authenticated: they see and change nothing.
-- Safe to apply more than once.

do $$
begin
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
end
$$;

create schema if not exists walsync;
create schema if not exists walsync_api;
revoke all on schema walsync from public;
revoke all on schema walsync_api from public;
grant usage on schema walsync_api to service_role;

-- Nodes: one row per store incarnation that ever pushed or pulled.
create table if not exists walsync.nodes (
  node_id      text primary key,
  created_at   timestamptz not null default now(),
  last_push_at timestamptz,
  last_pull_at timestamptz,
  -- every local record of this node up to acked_lsn is on the server
  acked_lsn    bigint not null default 0,
  -- HLC of the newest record acknowledged (the recovery point's time)
  acked_hlc    bigint not null default 0,
  -- the position this node confirmed it has applied (tombstone GC horizon)
  pull_cursor  bigint not null default 0
);

-- The position counter. Pushers take a transaction-scoped advisory lock
-- before drawing positions, so positions are handed out in commit order and
-- a puller reading "pos > cursor" can never skip a row that commits later
-- with a smaller position (the bigserial gap problem).
create table if not exists walsync.head (
  id  smallint primary key check (id = 1),
  pos bigint not null
);
insert into walsync.head values (1, 0) on conflict do nothing;

-- The entry log: every operation of every pushed record, once.
create table if not exists walsync.entries (
  pos        bigint not null,
  origin     text   not null,
  lsn        bigint not null,
  idx        integer not null,
  key        text   not null,
  deleted    boolean not null,
  data       bytea,
  codec      smallint not null,
  vv         jsonb  not null,
  hlc        bigint not null,
  fence      bigint not null default 0,
  value_hash text,
  received_at timestamptz not null default now(),
  -- a record writes a key once; a dot (origin, lsn) may cover many keys
  primary key (origin, lsn, key)
);
create unique index if not exists entries_pos on walsync.entries (pos);

-- The merged state: the maximal versions (an antichain) of every key.
create table if not exists walsync.siblings (
  key        text   not null,
  origin     text   not null,
  lsn        bigint not null,
  deleted    boolean not null,
  data       bytea,
  codec      smallint not null,
  vv         jsonb  not null,
  hlc        bigint not null,
  fence      bigint not null default 0,
  value_hash text,
  value_json jsonb,
  pos        bigint not null,
  primary key (key, origin, lsn)
);

-- Leases on runs (taken before a host drives a run); used by fencing.
create table if not exists walsync.leases (
  run_id      text primary key,
  holder      text not null,
  token       bigint not null,
  expires_at  timestamptz not null,
  acquired_at timestamptz not null default now()
);

-- Entries a push refused because they carried an older fencing token than
-- the run's current lease (kept for inspection, never merged).
create table if not exists walsync.fenced (
  origin     text   not null,
  lsn        bigint not null,
  key        text   not null,
  run_id     text   not null,
  fence      bigint not null,
  current    bigint not null,
  data       bytea,
  received_at timestamptz not null default now(),
  primary key (origin, lsn, key)
);
alter table walsync.fenced enable row level security;
revoke all on walsync.fenced from public, anon, authenticated;

-- Values PostgreSQL compresses itself (rows over ~2 kB: a value and its JSON
-- view) use lz4 where the server has it (PostgreSQL 14+ built with lz4, as
-- Supabase's is): several times cheaper than the default pglz on every push.
do $$
begin
  if exists (select from pg_settings
             where name = 'default_toast_compression' and 'lz4' = any(enumvals)) then
    alter table walsync.entries alter column data set compression lz4;
    alter table walsync.siblings alter column data set compression lz4,
                                 alter column value_json set compression lz4;
    alter table walsync.fenced alter column data set compression lz4;
  end if;
end
$$;

-- The run a key belongs to (runs/<id>, runs/<id>/..., index/runs/<id>), or null.
create or replace function walsync.run_of(p_key text) returns text
language sql immutable parallel safe
as $$
  select case
    when p_key like 'runs/%' then pg_catalog.split_part(pg_catalog.substr(p_key, 6), '/', 1)
    when p_key like 'index/runs/%' then pg_catalog.split_part(pg_catalog.substr(p_key, 12), '/', 1)
  end
$$;

alter table walsync.nodes    enable row level security;
alter table walsync.head     enable row level security;
alter table walsync.entries  enable row level security;
alter table walsync.siblings enable row level security;
alter table walsync.leases   enable row level security;
revoke all on all tables in schema walsync from public, anon, authenticated;

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

-- The winner of each key: highest fence, then HLC, then origin (byte order), then LSN.
create or replace view walsync.state with (security_invoker = true) as
  select distinct on (key) key, deleted, data, codec, vv, hlc, origin, lsn, fence, value_hash,
         value_json, pos
  from walsync.siblings
  order by key, fence desc, hlc desc, origin collate "C" desc, lsn desc;

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
  group by key
  having count(distinct (deleted, coalesce(value_hash, ''))) > 1;

revoke all on all tables in schema walsync from public, anon, authenticated;

-- push: one transaction per batch, the batch as parallel arrays (element i of
-- every array is entry i). Idempotent by (origin, lsn, key): a re-sent batch
-- inserts nothing and returns the same acknowledgement.
create or replace function walsync_api.push(
  p_node text, p_through_lsn bigint,
  p_lsn bigint[], p_idx integer[], p_key text[], p_deleted boolean[], p_data bytea[],
  p_codec smallint[], p_vv jsonb[], p_hlc bigint[], p_fence bigint[], p_value_hash text[],
  p_value_json text[])
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
-- plan_cache_mode is chosen per call below; never a JIT compile
set plan_cache_mode = auto
set jit = off
as $$
declare
  v_n       integer := coalesce(cardinality(p_lsn), 0);
  v_head    bigint;
  v_min     bigint;
  v_max     bigint;
  v_result  record;
  v_acked   bigint;
begin
  if p_node is null or p_node = '' then
    raise exception 'push needs a node id' using errcode = '22023';
  end if;
  -- p_data, p_fence, p_value_hash and p_value_json may be null (all nulls / zeros)
  if coalesce(cardinality(p_idx), 0) <> v_n or coalesce(cardinality(p_key), 0) <> v_n
     or coalesce(cardinality(p_deleted), 0) <> v_n or coalesce(cardinality(p_codec), 0) <> v_n
     or coalesce(cardinality(p_vv), 0) <> v_n or coalesce(cardinality(p_hlc), 0) <> v_n
     or cardinality(p_data) <> v_n or cardinality(p_fence) <> v_n
     or cardinality(p_value_hash) <> v_n or cardinality(p_value_json) <> v_n then
    raise exception 'push: the entry arrays differ in length' using errcode = '22023';
  end if;
  perform pg_advisory_xact_lock(hashtext('walsync.push'));
  insert into nodes (node_id) values (p_node) on conflict do nothing;
  select pos into v_head from head where id = 1 for update;
  -- the batch's LSN range bounds the duplicate checks below to an index range
  select min(l), max(l) into v_min, v_max from unnest(p_lsn) l;
  -- A big batch gets a plan made for its arrays (their sizes, its LSN range);
  -- a small one reuses the cached generic plan (planning would cost more
  -- than running it).
  perform set_config('plan_cache_mode',
                     case when v_n > 64 then 'force_custom_plan' else 'force_generic_plan' end,
                     true);

  -- Narrow columns (identity, order, fencing, version vector) go through the
  -- checks, sorts and probes; the wide ones (bytes, JSON) stream from the
  -- arrays straight into the inserts, which find each entry's position by
  -- its ordinal in an array ("slots": no join or sort of the wide rows).
  with x as materialized (
    select u.n, u.lsn, u.idx, u.key, coalesce(u.fence, 0) as fence, u.vv
    from unnest(p_lsn, p_idx, p_key, p_fence, p_vv) with ordinality
         as u(lsn, idx, key, fence, vv, n)
  ),
  w as not materialized (
    select u.n, u.lsn, u.idx, u.key, u.deleted, u.data, u.codec, u.vv, u.hlc,
           coalesce(u.fence, 0) as fence, u.value_hash, u.value_json
    from unnest(p_lsn, p_idx, p_key, p_deleted, p_data, p_codec, p_vv, p_hlc, p_fence,
                p_value_hash, p_value_json)
         with ordinality as u(lsn, idx, key, deleted, data, codec, vv, hlc, fence, value_hash,
                              value_json, n)
  ),
  -- Fencing: an entry for a run's keys carrying an older token than the
  -- run's current lease is refused and recorded, never merged.
  refused as materialized (
    select x.n, x.lsn, x.key, l.run_id, x.fence, l.token as current, l.holder
    from x join leases l on l.run_id = walsync.run_of(x.key)
    where x.fence < l.token
  ),
  fenced_rows as (
    insert into fenced (origin, lsn, key, run_id, fence, current, data)
    select p_node, r.lsn, r.key, r.run_id, r.fence, r.current, w.data
    from refused r join w on w.n = r.n
    on conflict do nothing
    returning 1
  ),
  -- An entry sent twice in one batch counts once (distinct on its identity).
  incoming as (
    select distinct on (x.lsn, x.key) x.* from x
    where not exists (select 1 from entries e
                      where e.origin = p_node and e.lsn = x.lsn and e.key = x.key
                        and e.lsn between v_min and v_max)
      and not exists (select 1 from refused r where r.lsn = x.lsn and r.key = x.key)
      and not exists (select 1 from fenced f
                      where f.origin = p_node and f.lsn = x.lsn and f.key = x.key
                        and f.lsn between v_min and v_max)
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
  -- Each key's stored siblings, read once through the primary key (a lateral
  -- aggregate: one index probe per key, whatever the table's statistics):
  -- is the new version dominated by (or equal to) one of them, and which of
  -- them does it dominate. "a <= b" is walsync.vv_leq written out, so the
  -- executor runs it as a subplan instead of a SQL function call per pair.
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
      from siblings s where s.key = l.key
    ) p
    where not p.dominated
  ),
  -- By ordinal: the entry's position if it is new (else 0), and again if it
  -- is merged into siblings.
  slots as materialized (
    select array_agg(coalesce(nb.pos, 0) order by x.n) as entry_pos,
           array_agg(coalesce(c.pos, 0) order by x.n) as sibling_pos
    from x left join numbered nb on nb.n = x.n left join candidates c on c.n = x.n
  ),
  fresh as (
    insert into entries (pos, origin, lsn, idx, key, deleted, data, codec, vv, hlc, fence,
                         value_hash)
    select (select entry_pos from slots)[w.n], p_node, w.lsn, w.idx, w.key, w.deleted, w.data,
           w.codec, w.vv, w.hlc, w.fence, w.value_hash
    from w where (select entry_pos from slots)[w.n] > 0
    returning pos
  ),
  dropped as (
    delete from siblings
    where ctid = any (array(select unnest(c.dropping) from candidates c))
    returning 1
  ),
  added as (
    insert into siblings (key, origin, lsn, deleted, data, codec, vv, hlc, fence, value_hash,
                          value_json, pos)
    select w.key, p_node, w.lsn, w.deleted, w.data, w.codec, w.vv, w.hlc, w.fence,
           w.value_hash, w.value_json::jsonb, (select sibling_pos from slots)[w.n]
    from w where (select sibling_pos from slots)[w.n] > 0
    returning 1
  )
  select (select count(*) from fresh) as inserted,
         (select count(*) from added) as merged,
         (select count(*) from dropped) as dropped,
         (select count(*) from fenced_rows) as newly_fenced,
         (select max(h) from unnest(p_hlc) h) as max_hlc,
         -- with the lease's holder: a pusher that holds the lease itself had
         -- only stale writes of its own refused (made before it took the
         -- lease, or unfenced), it did not lose the run
         (select coalesce(jsonb_agg(distinct jsonb_build_object('run_id', run_id,
                                                                'current', current,
                                                                'holder', holder)),
                          '[]'::jsonb) from refused) as fenced
    into v_result;

  update head set pos = v_head + v_result.inserted where id = 1;
  update nodes
     set acked_lsn = greatest(acked_lsn, coalesce(p_through_lsn, 0)),
         acked_hlc = greatest(acked_hlc, coalesce(v_result.max_hlc, 0)),
         last_push_at = now()
   where node_id = p_node
  returning acked_lsn into v_acked;
  return jsonb_build_object('acked_lsn', v_acked, 'inserted', v_result.inserted,
                            'merged', v_result.merged, 'head', v_head + v_result.inserted,
                            'fenced', v_result.fenced);
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
  v_upper bigint;
  v_head  bigint;
  v_last  record;
  v_out   jsonb;
begin
  select pos into v_head from head where id = 1;
  v_upper := least(v_head, p_after + greatest(p_limit, 1));
  select origin, lsn into v_last from entries where pos = v_upper;
  if found then
    select greatest(v_upper, max(pos)) into v_upper
    from entries where origin = v_last.origin and lsn = v_last.lsn;
  end if;
  select coalesce(jsonb_agg(jsonb_build_object(
           'pos', e.pos, 'origin', e.origin, 'lsn', e.lsn, 'idx', e.idx, 'key', e.key,
           'deleted', e.deleted, 'data', translate(encode(e.data, 'base64'), E'\n', ''),
           'codec', e.codec, 'vv', e.vv, 'hlc', e.hlc, 'fence', e.fence,
           'value_hash', e.value_hash) order by e.pos), '[]'::jsonb)
    into v_out
  from entries e
  where e.pos > p_after and e.pos <= v_upper and e.origin <> p_node;
  insert into nodes (node_id, pull_cursor, last_pull_at) values (p_node, p_after, now())
  on conflict (node_id) do update
    set pull_cursor = greatest(nodes.pull_cursor, excluded.pull_cursor), last_pull_at = now();
  return jsonb_build_object('entries', v_out, 'next', greatest(v_upper, p_after),
                            'head', v_head);
end
$$;

-- A node's acknowledged position (the replicator's resume point after it
-- lost its local record of it, and the recovery point of a lost host).
create or replace function walsync_api.node_status(p_node text)
returns jsonb
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  select coalesce(
    (select jsonb_build_object('node_id', node_id, 'acked_lsn', acked_lsn,
                               'acked_hlc', acked_hlc, 'pull_cursor', pull_cursor,
                               'last_push_at', last_push_at, 'last_pull_at', last_pull_at)
     from nodes where node_id = p_node),
    jsonb_build_object('node_id', p_node, 'acked_lsn', 0, 'acked_hlc', 0, 'pull_cursor', 0))
$$;

create or replace function walsync_api.head()
returns jsonb
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  select jsonb_build_object('head', pos, 'schema_version', 1) from head where id = 1
$$;

-- The siblings of keys under a prefix that are in conflict.
create or replace function walsync_api.conflicts(p_prefix text, p_limit integer)
returns jsonb
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  select coalesce(jsonb_agg(jsonb_build_object('key', c.key, 'versions', c.versions)
                            order by c.key), '[]'::jsonb)
  from (select * from conflicts
        where key like replace(replace(replace(p_prefix, '\', '\\'), '%', '\%'), '_', '\_') || '%'
        order by key limit p_limit) c
$$;

revoke all on all functions in schema walsync_api from public, anon, authenticated;
revoke all on all functions in schema walsync from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;
