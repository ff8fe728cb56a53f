-- walsync: scoped pull, and a retention window for the entry log
-- (sync/PROTOCOL.md, "Scoped pull" and "Retention of the entry log").
--
-- Scoped pull: a store pulls only the keys under the prefixes it declares (and
-- those a named group of prefixes, kept here, lists). The entry log is read by
-- an index on each key's first segment (the text before its first '/'), in
-- position order, so a scoped pull reads the rows of its own segments and none
-- of another's; a prefix therefore names at least a first segment (it holds a
-- '/'), or is '' (everything). A store that widens its scope fills the new
-- prefixes in from the merged state (scope_backfill), up to the position it had
-- pulled to, and pulls the rest from the log.
--
-- Retention: the log keeps every entry of the window (per database, 7 days by
-- default) and, older than it, what the state at the window's start needs: the
-- entries no other entry as old dominates (every key's current siblings among
-- them). A tombstone that is all a key holds is collected, with every entry it
-- dominates, once it is older than the window and every live node (one that
-- pulled within the window) pulled past it; a node whose cursor is behind a
-- collected tombstone is told by pull to re-bootstrap. compact_log() does it,
-- one caller at a time (a transaction-scoped advisory lock, safe behind a
-- pooler): `walsync sync` calls it, or pg_cron.
--
-- Plain SQL, safe to apply more than once.

-- The first segment of a key: the text before its first '/' (the whole key when
-- it has none). Immutable: the entry log is indexed by it.
create or replace function walsync.key_lane(p_key text) returns text
language sql immutable parallel safe
as $$
  select pg_catalog.split_part(p_key, '/', 1)
$$;

-- A scoped pull reads each of its segments in position order through this index.
create index if not exists entries_lane on walsync.entries (walsync.key_lane(key), tenant, pos);

-- Named groups of prefixes: stores that pull a group pull what it lists now.
create table if not exists walsync.scope_groups (
  tenant     text not null default '',
  name       text not null check (name <> ''),
  prefixes   text[] not null,
  updated_at timestamptz not null default now(),
  primary key (name, tenant)
);
alter table walsync.scope_groups enable row level security;

-- The entry log's retention, per tenant (a row only once set or compacted):
-- the window, the newest position of a tombstone compaction collected (a pull
-- after a position below it must re-bootstrap), and the oldest HLC whose cut the
-- log still holds exactly (the last compaction's boundary).
create table if not exists walsync.log_settings (
  tenant            text primary key default '',
  retention_seconds double precision not null default 604800 check (retention_seconds > 0),
  gc_through        bigint not null default 0,
  window_start_hlc  bigint not null default 0,
  compacted_at      timestamptz,
  compacted_entries bigint not null default 0
);
alter table walsync.log_settings enable row level security;

-- The tombstones compaction collected, without their log: a store that was away
-- (re-bootstrapping) or had the key outside its scope learns from them that a key
-- it holds was deleted (scope_backfill delivers them as deleted siblings). A row
-- goes once every node that ever pulled has pulled past it.
create table if not exists walsync.collected (
  tenant text not null default '',
  key    text not null,
  origin text not null,
  lsn    bigint not null,
  pos    bigint not null,
  vv     jsonb not null,
  hlc    bigint not null,
  fence  bigint not null default 0,
  primary key (key, origin, lsn, tenant)
);
create index if not exists collected_pos on walsync.collected (tenant, pos);
alter table walsync.collected enable row level security;

revoke all on walsync.scope_groups, walsync.log_settings, walsync.collected
  from public, anon, authenticated;

-- Where the tenant column stands in each table's key: as in
-- 20261207000008_push_in_parallel.sql, with walsync.scope_groups and
-- walsync.log_settings.
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
      ('siblings', 'key, origin, lsn'), ('leases', 'run_id'), ('fenced', 'origin, lsn, key'),
      ('key_locks', 'key'), ('scope_groups', 'name'), ('log_settings', null),
      ('collected', 'key, origin, lsn'))
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

select walsync.tenant_keys(exists (select from walsync.tenant_settings));

-- A scope's prefixes, checked: '' (everything) or holding a '/'.
create or replace function walsync.scope_checked(p_prefixes text[]) returns text[]
language plpgsql immutable
set search_path = pg_catalog, walsync
as $$
declare
  p text;
begin
  foreach p in array coalesce(p_prefixes, '{}'::text[]) loop
    if p is null or (p <> '' and strpos(p, '/') = 0) then
      raise exception 'scope prefix %: a prefix must hold a ''/'' (it names at least a '
                      'first segment, such as ''app/''), or be '''' for every key',
                      coalesce(quote_literal(p), 'null')
        using errcode = '22023',
              hint = 'write the prefix up to and including its first ''/''';
    end if;
  end loop;
  return coalesce(p_prefixes, '{}'::text[]);
end
$$;

-- A scope's prefixes as a client sends them (a JSON array of text; null: none),
-- checked as above.
create or replace function walsync.scope_prefixes(p_prefixes jsonb) returns text[]
language plpgsql immutable
set search_path = pg_catalog, walsync
as $$
begin
  if p_prefixes is null or jsonb_typeof(p_prefixes) = 'null' then
    return null;
  end if;
  if jsonb_typeof(p_prefixes) <> 'array'
     or exists (select 1 from jsonb_array_elements(p_prefixes) x
                where jsonb_typeof(x) <> 'string') then
    raise exception 'scope prefixes must be a JSON array of text, not %', p_prefixes
      using errcode = '22023';
  end if;
  return walsync.scope_checked(array(select jsonb_array_elements_text(p_prefixes)));
end
$$;

-- Set (p_prefixes not null; an empty array removes the group) and list the
-- scope groups: p_name null lists them all.
create or replace function walsync_api.scope_group(p_name text, p_prefixes jsonb)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant   text := walsync.require_tenant();
  v_prefixes text[] := walsync.scope_prefixes(p_prefixes);
begin
  if v_prefixes is not null then
    if p_name is null or p_name = '' then
      raise exception 'a scope group needs a name' using errcode = '22023';
    end if;
    if cardinality(v_prefixes) = 0 then
      delete from scope_groups where tenant = v_tenant and name = p_name;
    else
      insert into scope_groups (tenant, name, prefixes)
      values (v_tenant, p_name,
              array(select distinct p collate "C" from unnest(v_prefixes) p order by 1))
      on conflict (name, tenant) do update
        set prefixes = excluded.prefixes, updated_at = now();
    end if;
  end if;
  return jsonb_build_object('groups', coalesce((
    select jsonb_agg(jsonb_build_object('name', g.name, 'prefixes', to_jsonb(g.prefixes))
                     order by g.name collate "C")
    from scope_groups g
    where g.tenant = v_tenant and (p_name is null or g.name = p_name)), '[]'::jsonb));
end
$$;

-- A widened scope's fill: every stored sibling of up to p_limit keys under
-- p_prefix (but under none of p_except, a JSON array of prefixes) after
-- p_after_key (byte order) that another origin than p_node wrote at a position in
-- (p_after_pos, p_upto]: what the store's cursor passed while the prefix was
-- outside its scope (up to p_after_pos it pulled them while inside; after
-- p_upto it pulls them).
create or replace function walsync_api.scope_backfill(p_node text, p_prefix text,
                                                      p_after_pos bigint, p_upto bigint,
                                                      p_except jsonb, p_after_key text,
                                                      p_limit integer)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  v_except text[] := coalesce(walsync.scope_prefixes(p_except), '{}'::text[]);
begin
  perform walsync.scope_checked(array[coalesce(p_prefix, '')]);
  return (
    -- the stored siblings, and the tombstones compaction collected (deleted
    -- siblings without a value)
    with held as (
      select s.key, s.origin, s.lsn, s.pos, s.deleted, s.data, s.codec, s.vv, s.hlc,
             s.fence, s.value_hash
      from siblings s where s.tenant = v_tenant
      union all
      select c.key, c.origin, c.lsn, c.pos, true, null, 0::smallint, c.vv, c.hlc, c.fence,
             null
      from collected c where c.tenant = v_tenant
    ),
    page as (
      select distinct key collate "C" as key
      from held
      where key collate "C" >= coalesce(p_prefix, '')
        and starts_with(key, coalesce(p_prefix, ''))
        and (p_after_key is null or key collate "C" > p_after_key collate "C")
        and pos > coalesce(p_after_pos, 0) and pos <= p_upto and origin <> p_node
        and not exists (select 1 from unnest(v_except) x where starts_with(key, x))
      order by 1
      limit greatest(p_limit, 1)
    )
    select jsonb_build_object(
      'rows', coalesce((
        select jsonb_agg(jsonb_build_object(
                 'key', s.key, 'origin', s.origin, 'lsn', s.lsn, 'pos', s.pos,
                 'deleted', s.deleted,
                 'data', replace(encode(s.data, 'base64'), E'\n', ''), 'codec', s.codec,
                 'vv', s.vv, 'hlc', s.hlc, 'fence', s.fence, 'value_hash', s.value_hash)
               order by s.key collate "C", s.origin collate "C", s.lsn)
        from held s join page p on s.key = p.key
        where s.pos > coalesce(p_after_pos, 0) and s.pos <= p_upto
          and s.origin <> p_node), '[]'::jsonb),
      'last_key', (select max(key collate "C") from page),
      'done', (select count(*) from page) < greatest(p_limit, 1)));
end
$$;

-- One page of pull as rows (the postgres transport reads it so: no JSON document
-- to build and parse, the bytes as bytea): other origins' entries after a
-- position whose key starts with one of p_prefixes or of the prefixes group
-- p_group lists (both null, or a prefix '': every key; '[]': none), in position
-- order, whole records only (a record's entries in scope): at most about p_limit
-- rows. A last row with a null pos carries the page's "next" (the position to
-- pass next time), "head", "scope" (the prefixes the page was read with, each
-- once, none another covers; null: every key) and, for a cursor behind a
-- tombstone compaction collected (0 < p_after < gc_through), "refused"
-- ('compacted') and "gc_through": the store must re-bootstrap.
create or replace function walsync_api.pull_rows(p_node text, p_after bigint, p_limit integer,
                                                 p_prefixes jsonb, p_group text)
returns table (pos bigint, origin text, lsn bigint, idx integer, key text, deleted boolean,
               data bytea, codec smallint, vv jsonb, hlc bigint, fence bigint,
               value_hash text, next bigint, head bigint, scope jsonb, refused text,
               gc_through bigint)
language plpgsql security definer
set search_path = pg_catalog, walsync
-- Every read below has an index in position order; a plan cached for some other
-- cursor must not trade it for a scan of the log and a sort (a page would then
-- read the whole log instead of its own rows).
set enable_seqscan = off
as $$
#variable_conflict use_column
declare
  v_tenant text := walsync.require_tenant();
  v_limit  integer := greatest(p_limit, 1);
  v_upper  bigint;
  v_head   bigint;
  v_gc     bigint;
  v_last   record;
  v_scope  text[];
  v_lanes  text[];
  v_group  text[];
  v_count  bigint := 0;
  v_found  bigint;
  r        record;
begin
  -- a tenant that never pushed has no head row: its head is 0 (never "no limit")
  v_head := coalesce((select h.pos from walsync.head h where h.tenant = v_tenant), 0);
  v_gc := coalesce((select s.gc_through from walsync.log_settings s
                    where s.tenant = v_tenant), 0);
  if p_after > 0 and p_after < v_gc then
    return query select null::bigint, null::text, null::bigint, null::integer, null::text,
                        null::boolean, null::bytea, null::smallint, null::jsonb,
                        null::bigint, null::bigint, null::text, p_after, v_head,
                        null::jsonb, 'compacted'::text, v_gc;
    return;
  end if;
  v_scope := walsync.scope_prefixes(p_prefixes);
  if v_scope is not null or p_group is not null then
    v_scope := coalesce(v_scope, '{}'::text[]);
    if p_group is not null then
      select g.prefixes into v_group from walsync.scope_groups g
       where g.tenant = v_tenant and g.name = p_group;
      if not found then
        raise exception 'scope group "%" does not exist', p_group
          using errcode = '22023',
                hint = 'create it (walsync scope group NAME PREFIX...) or pull without it';
      end if;
      v_scope := v_scope || v_group;
    end if;
    -- each prefix once, none that a shorter one covers
    v_scope := array(select distinct x.p collate "C" from unnest(v_scope) x(p)
                      where not exists (select 1 from unnest(v_scope) y(q)
                                        where y.q <> x.p and starts_with(x.p, y.q))
                      order by 1);
    if '' = any (v_scope) then
      v_scope := null;  -- every key
    end if;
  end if;

  if v_scope is null then
    v_upper := least(v_head, p_after + v_limit);
    select e.origin, e.lsn into v_last from walsync.entries e
     where e.tenant = v_tenant and e.pos = v_upper;
    if found then  -- finish the record the page ends in
      select greatest(v_upper, max(e.pos)) into v_upper from walsync.entries e
       where e.tenant = v_tenant and e.origin = v_last.origin and e.lsn = v_last.lsn;
    end if;
    return query
      select e.pos, e.origin, e.lsn, e.idx, e.key, e.deleted, e.data, e.codec, e.vv, e.hlc,
             e.fence, e.value_hash, null::bigint, null::bigint, null::jsonb, null::text,
             null::bigint
      from walsync.entries e
      where e.tenant = v_tenant and e.pos > p_after and e.pos <= v_upper
        and e.origin <> p_node
      order by e.pos;
  else
    -- The first p_limit rows in scope: each first segment read in position order
    -- through entries_lane, so no row of another segment is read.
    v_lanes := array(select distinct walsync.key_lane(x.p) from unnest(v_scope) x(p));
    for r in
      select x.* from unnest(v_lanes) l(lane)
      cross join lateral (
        select e.* from walsync.entries e
         where walsync.key_lane(e.key) = l.lane and e.tenant = v_tenant
           and e.pos > p_after and e.pos <= v_head and e.origin <> p_node
           and exists (select 1 from unnest(v_scope) y(p) where starts_with(e.key, y.p))
         order by e.pos limit v_limit) x
      order by x.pos limit v_limit
    loop
      v_count := v_count + 1;
      v_found := r.pos;
      pos := r.pos; origin := r.origin; lsn := r.lsn; idx := r.idx; key := r.key;
      deleted := r.deleted; data := r.data; codec := r.codec; vv := r.vv; hlc := r.hlc;
      fence := r.fence; value_hash := r.value_hash;
      return next;
    end loop;
    if v_count < v_limit then
      v_upper := v_head;  -- nothing more in scope up to the head
    else
      select e.origin, e.lsn into v_last from walsync.entries e
       where e.tenant = v_tenant and e.pos = v_found;
      -- finish the record the page ends in: the rows in scope up to its last one
      select greatest(v_found, max(e.pos)) into v_upper from walsync.entries e
       where e.tenant = v_tenant and e.origin = v_last.origin and e.lsn = v_last.lsn;
      if v_upper > v_found then
        return query
          select x.pos, x.origin, x.lsn, x.idx, x.key, x.deleted, x.data, x.codec, x.vv,
                 x.hlc, x.fence, x.value_hash, null::bigint, null::bigint, null::jsonb,
                 null::text, null::bigint
          from unnest(v_lanes) l(lane)
          cross join lateral (
            select e.* from walsync.entries e
             where walsync.key_lane(e.key) = l.lane and e.tenant = v_tenant
               and e.pos > v_found and e.pos <= v_upper and e.origin <> p_node
               and exists (select 1 from unnest(v_scope) y(p) where starts_with(e.key, y.p))
             order by e.pos limit v_upper - v_found) x
          order by x.pos;
      end if;
    end if;
  end if;
  insert into walsync.nodes as n (tenant, node_id, pull_cursor, last_pull_at)
  values (v_tenant, p_node, p_after, now())
  on conflict (tenant, node_id) do update
    set pull_cursor = greatest(n.pull_cursor, excluded.pull_cursor), last_pull_at = now();
  return query select null::bigint, null::text, null::bigint, null::integer, null::text,
                      null::boolean, null::bytea, null::smallint, null::jsonb, null::bigint,
                      null::bigint, null::text, greatest(v_upper, p_after), v_head,
                      to_jsonb(v_scope), null::text, null::bigint;
end
$$;

-- pull with a scope, as one document (pull_rows' page): {entries, next, head,
-- scope}, or {entries: [], next, head, refused: 'compacted', gc_through}.
create or replace function walsync_api.pull_scoped(p_node text, p_after bigint, p_limit integer,
                                                    p_prefixes jsonb, p_group text)
returns jsonb
language sql security definer
set search_path = pg_catalog, walsync
as $$
  select case when max(r.refused) is not null
    then jsonb_build_object('entries', '[]'::jsonb, 'next', max(r.next), 'head', max(r.head),
                            'refused', max(r.refused), 'gc_through', max(r.gc_through))
    else jsonb_build_object(
      'entries', coalesce(jsonb_agg(jsonb_build_object(
                   'pos', r.pos, 'origin', r.origin, 'lsn', r.lsn, 'idx', r.idx,
                   'key', r.key, 'deleted', r.deleted,
                   'data', replace(encode(r.data, 'base64'), E'\n', ''),
                   'codec', r.codec, 'vv', r.vv, 'hlc', r.hlc, 'fence', r.fence,
                   'value_hash', r.value_hash) order by r.pos)
                 filter (where r.pos is not null), '[]'::jsonb),
      'next', max(r.next), 'head', max(r.head),
      'scope', (array_agg(r.scope) filter (where r.pos is null))[1])
    end
  from walsync_api.pull_rows(p_node, p_after, p_limit, p_prefixes, p_group) r
$$;

-- pull: every key (pull_scoped without a scope), refusing a cursor behind a
-- collected tombstone like it. Same arguments and results as before.
create or replace function walsync_api.pull(p_node text, p_after bigint, p_limit integer)
returns jsonb
language sql security definer
set search_path = pg_catalog, walsync
as $$
  select walsync_api.pull_scoped(p_node, p_after, p_limit, null, null) - 'scope'
$$;

-- The point-in-time window (as 20261207000009_nodes_and_points.sql defined it),
-- moved by compaction: a cut older than the last compaction's boundary may miss
-- entries it removed, so from_hlc is the later of the oldest entry's HLC and that
-- boundary.
create or replace function walsync_api.log_window()
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  v_start  bigint := nullif(coalesce((select window_start_hlc from log_settings
                                      where tenant = v_tenant), 0), 0);
begin
  return (
    select jsonb_build_object('from_hlc', case when count(*) > 0
                                               then greatest(min(e.hlc), v_start) end,
                              'to_hlc', max(e.hlc),
                              'entries', count(*),
                              'head', coalesce((select pos from head where tenant = v_tenant),
                                               0))
    from entries e where e.tenant = v_tenant);
end
$$;

-- Read (p_retention_seconds null) or set the entry log's retention window.
create or replace function walsync_api.log_retention(p_retention_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  s        log_settings%rowtype;
begin
  if p_retention_seconds is not null then
    if not (p_retention_seconds > 0 and p_retention_seconds < 'infinity') then
      raise exception 'the retention window must be a positive number of seconds, not %',
                      p_retention_seconds using errcode = '22023';
    end if;
    insert into log_settings (tenant, retention_seconds) values (v_tenant, p_retention_seconds)
    on conflict (tenant) do update set retention_seconds = excluded.retention_seconds;
  end if;
  select * into s from log_settings where tenant = v_tenant;
  return jsonb_build_object(
    'retention_seconds', coalesce(s.retention_seconds, 604800),
    'gc_through', coalesce(s.gc_through, 0),
    'window_start_hlc', coalesce(s.window_start_hlc, 0),
    'compacted_at', s.compacted_at,
    'compacted_entries', coalesce(s.compacted_entries, 0));
end
$$;

-- Compact the entry log beyond the retention window (see the top of this file).
-- One caller at a time: another finds the lock taken and returns ran = false at
-- once. For pg_cron: select walsync_api.compact_log();
create or replace function walsync_api.compact_log()
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant    text := walsync.require_tenant();
  v_window    double precision;
  v_boundary  bigint;
  v_floor     bigint;
  v_head      bigint;
  v_tombs     bigint := 0;
  v_gc        bigint;
  v_removed   bigint := 0;
  v_dominated bigint := 0;
  v_dropped   bigint := 0;
begin
  if not pg_try_advisory_xact_lock(hashtext('walsync.compact_log'), hashtext(v_tenant)) then
    return jsonb_build_object('ran', false, 'removed_entries', 0, 'collected_tombstones', 0,
                              'gc_through', coalesce((select gc_through from log_settings
                                                      where tenant = v_tenant), 0),
                              'window_start_hlc', coalesce((select window_start_hlc
                                                            from log_settings
                                                            where tenant = v_tenant), 0));
  end if;
  insert into log_settings (tenant) values (v_tenant) on conflict do nothing;
  select retention_seconds, gc_through into v_window, v_gc
    from log_settings where tenant = v_tenant for update;
  -- the boundary as an HLC: Unix ms << 16
  v_boundary := ((extract(epoch from now()) * 1000)::bigint
                 - (v_window * 1000)::bigint) << 16;
  v_head := coalesce((select pos from head where tenant = v_tenant), 0);
  -- how far every live node (one that pulled within the window) has pulled
  select coalesce(min(n.pull_cursor), v_head) into v_floor from nodes n
   where n.tenant = v_tenant and n.last_pull_at > now() - make_interval(secs => v_window);

  -- A push merging a version into a candidate key (one with a tombstone sibling old
  -- enough to collect) holds the key's row until it commits, and its version is
  -- invisible here until then: the candidates' rows are taken as a push takes them
  -- (in byte order, inserted if missing, locked without writing), so such a push
  -- finishes first. The next statement, with a snapshot of its own, sees its version.
  insert into key_locks (tenant, key)
  select v_tenant, k.key from (select distinct s.key collate "C" as key from siblings s
                               where s.tenant = v_tenant and s.deleted
                                 and s.hlc < v_boundary and s.pos <= v_floor
                               order by 1) k
  order by k.key
  on conflict (tenant, key) do update set key = excluded.key where false;

  -- Tombstones that are all their key holds, older than the window, pulled past by
  -- every live node: collected with every entry they dominate.
  with doomed as materialized (
    select s.key, s.origin, s.lsn, s.pos, s.vv, s.hlc, s.fence from siblings s
     where s.tenant = v_tenant and s.deleted and s.hlc < v_boundary and s.pos <= v_floor
       and not exists (select 1 from siblings o
                       where o.tenant = v_tenant and o.key = s.key
                         and (o.origin, o.lsn) <> (s.origin, s.lsn))
  ),
  kept as (
    insert into collected (tenant, key, origin, lsn, pos, vv, hlc, fence)
    select v_tenant, d.key, d.origin, d.lsn, d.pos, d.vv, d.hlc, d.fence from doomed d
    on conflict do nothing
    returning 1
  ),
  gone_siblings as (
    delete from siblings s using doomed c
     where s.tenant = v_tenant and s.key = c.key
    returning 1
  ),
  gone_entries as (
    delete from entries e using doomed c
     where e.tenant = v_tenant and e.key = c.key and walsync.vv_leq(e.vv, c.vv)
    returning 1
  )
  select (select count(*) from doomed), (select count(*) from gone_entries),
         greatest(v_gc, (select max(pos) from doomed)),
         (select count(*) from gone_siblings) + (select count(*) from kept)
    into v_tombs, v_removed, v_gc, v_dropped;
  -- collected tombstones every node that ever pulled has pulled past: no one needs them
  delete from collected c
   where c.tenant = v_tenant
     and c.pos <= coalesce((select min(n.pull_cursor) from nodes n
                            where n.tenant = v_tenant and n.last_pull_at is not null), 0);

  -- Entries older than the window that another entry as old dominates: no cut the
  -- window holds needs them (that entry is in every such cut). A current sibling
  -- is never among them. Equal vectors: the larger (origin, lsn) stays.
  delete from entries e
   where e.tenant = v_tenant and e.hlc < v_boundary
     and exists (select 1 from entries f
                 where f.tenant = v_tenant and f.key = e.key and f.hlc < v_boundary
                   and (f.origin, f.lsn) <> (e.origin, e.lsn)
                   and walsync.vv_leq(e.vv, f.vv)
                   and (not walsync.vv_leq(f.vv, e.vv)
                        or (f.origin collate "C", f.lsn) > (e.origin collate "C", e.lsn)))
     and not exists (select 1 from siblings s
                     where s.tenant = v_tenant and s.key = e.key and s.origin = e.origin
                       and s.lsn = e.lsn);
  get diagnostics v_dominated = row_count;

  update log_settings
     set gc_through = v_gc, window_start_hlc = greatest(window_start_hlc, v_boundary),
         compacted_at = now(), compacted_entries = compacted_entries + v_removed + v_dominated
   where tenant = v_tenant;
  return jsonb_build_object('ran', true, 'removed_entries', v_removed + v_dominated,
                            'collected_tombstones', v_tombs, 'gc_through', v_gc,
                            'window_start_hlc', greatest(
                              (select window_start_hlc from log_settings
                               where tenant = v_tenant), v_boundary));
end
$$;

revoke all on all functions in schema walsync_api from public, anon, authenticated;
revoke all on all functions in schema walsync from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;
