-- walsync: pushes from different nodes run in parallel (sync/PROTOCOL.md,
-- "Positions and the pull cursor" and "Scaling").
--
-- Before this file every push took one lock per tenant (an advisory lock and
-- the tenant's walsync.head row) for its whole transaction, merge included,
-- and held it through the client's COMMIT: the pushes of all nodes of a
-- database ran one at a time. Now a push holds, for its whole transaction,
-- only what is its own: its node's row (a node's pushes, a re-sent batch
-- included, still run one at a time) and one row per key of its batch
-- (walsync.key_locks, taken in byte order of the keys, so two pushes never
-- wait on each other in a cycle). What all pushes of a tenant share is brief:
--
--  * positions come from the tenant's sequence, a contiguous block per push,
--    drawn under a lock that is released as soon as the block is drawn (a
--    subtransaction's lock, released when it ends);
--  * before it draws, a push announces itself with two shared advisory locks
--    held to its commit (in flight: the tenant's tag, and the sequence's value
--    then, plus one: a floor under every position it will draw);
--  * last, it publishes walsync.head.pos under the tenant's head row (held to
--    commit, as before, but only for this step): the newest position below
--    every other push still in flight (read from pg_locks). So head.pos is a
--    horizon: every position at or below it is committed or will never be, and
--    pull, which reads entries up to head.pos, still never skips an entry that
--    commits later with a smaller position. A push that drew nothing (a re-sent
--    batch) publishes nothing.
--
-- pull, head, hello and every other reader of walsync.head are unchanged.
-- Positions stay per tenant and a push's are adjacent; an aborted push leaves
-- its block unused (a gap pull passes over).
-- Plain SQL, safe to apply more than once.

-- One row per key a push ever merged: the row a push locks while it merges the
-- key, so that two pushes of the same key merge one after the other (each
-- reads the siblings the other left). A row exists before the key's first
-- sibling does, so a key's first versions are ordered too.
create table if not exists walsync.key_locks (
  tenant text not null default '',
  key    text not null,
  primary key (key, tenant)
);
alter table walsync.key_locks enable row level security;
revoke all on walsync.key_locks from public, anon, authenticated;

-- Where the tenant column stands in each table's key: as in
-- 20261207000007_consolidated_api.sql, with walsync.key_locks.
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
      ('key_locks', 'key'))
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

-- The tenant's position sequence (walsync.positions for the default tenant '',
-- walsync.positions_<md5 of the name> for another), made at the tenant's first
-- push after this file: it goes on from the tenant's walsync.head.pos, the
-- last position handed out before. A sequence is not transactional, so pushes
-- draw from it without waiting for each other's commits. Owned by the tables'
-- owner (it creates a sequence); in tenant mode the functions' owner may draw
-- from it (the tenant file grants the rest).
create or replace function walsync.position_sequence(p_tenant text) returns regclass
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_name  text := case when p_tenant = '' then 'positions'
                       else 'positions_' || md5(p_tenant) end;
  v_seq   regclass := to_regclass('walsync.' || v_name);
  v_floor bigint;
begin
  if v_seq is not null then
    return v_seq;
  end if;
  begin
    select h.pos into v_floor from head h where h.tenant = p_tenant;
    execute format('create sequence walsync.%I as bigint minvalue 0 start with %s',
                   v_name, coalesce(v_floor, 0));
    v_seq := ('walsync.' || v_name)::regclass;
    perform nextval(v_seq);  -- its last value is now the floor (never "not called")
    if exists (select from pg_roles where rolname = 'walsync_tenant_api') then
      execute format('grant select, usage, update on sequence %s to walsync_tenant_api',
                     v_seq);
    end if;
  exception when duplicate_table or unique_violation then
    -- another first push of the tenant made it and committed meanwhile: read the
    -- catalog itself (this transaction's name cache may not know it yet)
    select c.oid::regclass into v_seq from pg_class c
     where c.relnamespace = 'walsync'::regnamespace and c.relname = v_name;
  end;
  return v_seq;
end
$$;

-- The default tenant's sequence is made here, going on from the positions
-- handed out before (a database made before this file), so that every database
-- has it; another tenant's is made at its first push.
do $$
begin
  if to_regclass('walsync.positions') is null then
    create sequence walsync.positions as bigint minvalue 0 start with 0;
    perform setval('walsync.positions',
                   coalesce((select h.pos from walsync.head h where h.tenant = ''), 0));
  end if;
end
$$;
revoke all on sequence walsync.positions from public, anon, authenticated;

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
--
-- Concurrency (this file's header): the node's row, then the batch's keys in
-- byte order, are locked before anything is read; positions are drawn once the
-- number of new entries is known; walsync.head is published last.
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
  v_seq         regclass;
  v_new         bigint;    -- entries this push stores (each takes a position)
  v_base        bigint;    -- the position before this push's block
  v_last        bigint;
  v_inflight    bigint;
  v_head        bigint;
  v_entry_pos   bigint[];  -- by ordinal: the entry's place in the block (0: not new)
  v_sibling_pos bigint[];  -- the same, for the entries merged into siblings
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

  -- A node's pushes one at a time: a batch re-sent while the first sending still
  -- runs waits for it, then finds its entries stored.
  insert into nodes (tenant, node_id) values (v_tenant, p_node) on conflict do nothing;
  perform from nodes where tenant = v_tenant and node_id = p_node for update;
  if not exists (select from head where tenant = v_tenant) then  -- a tenant's first push
    insert into head (tenant, pos) values (v_tenant, 0) on conflict do nothing;
  end if;
  v_seq := walsync.position_sequence(v_tenant);
  -- Each key's merge one push at a time, keys locked in byte order (no cycle of
  -- waits): a key's row is inserted (new key) or locked where it is (the false
  -- WHERE locks without writing a row version).
  insert into key_locks (tenant, key)
  select v_tenant, k.key from (select distinct u.key collate "C" as key
                               from unnest(p_key) u(key) order by 1) k
  order by k.key
  on conflict (tenant, key) do update set key = excluded.key where false;

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
  -- each new entry's place in this push's block of positions (drawn below)
  numbered as materialized (
    select i.*, row_number() over (order by i.lsn, i.idx, i.key) as pos
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
  -- By ordinal: the entry's place if it is new (else 0), and again if it is
  -- merged into siblings; the siblings it drops; what fencing refused.
  select array_agg(coalesce(nb.pos, 0) order by x.n),
         array_agg(coalesce(c.pos, 0) order by x.n),
         (select count(*) from numbered),
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
    into v_entry_pos, v_sibling_pos, v_new, v_drop, v_ref_n, v_ref_run, v_ref_current,
         v_ref_holder, v_fenced, v_max_hlc
  from x left join numbered nb on nb.n = x.n left join candidates c on c.n = x.n;

  if v_new > 0 then
    -- In flight from here to commit: the tenant's tag, and a floor under every
    -- position this push draws (the sequence only grows), read before drawing.
    perform pg_advisory_xact_lock_shared(hashtext('walsync.inflight'), hashtext(v_tenant));
    perform pg_advisory_xact_lock_shared(pg_sequence_last_value(v_seq) + 1);
    -- A contiguous block, drawn under a lock its subtransaction releases at once
    -- (a record's positions are adjacent; one setval moves the sequence past
    -- the whole block, so no reader sees a value inside it).
    begin
      perform pg_advisory_xact_lock(hashtext('walsync.draw'), hashtext(v_tenant));
      v_base := pg_sequence_last_value(v_seq);
      perform setval(v_seq, v_base + v_new);
      raise exception using errcode = 'WSDRW';
    exception when sqlstate 'WSDRW' then
      null;  -- drawn: the block stays, the lock goes
    end;
  end if;

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
    -- could scan all of it. The tids are this tenant's rows of keys this push holds
    -- locked (no other push moves them): a tenant filter here would only make a
    -- scan read every row's last column.
    perform set_config('plan_cache_mode', 'force_custom_plan', true);
    delete from siblings where ctid = any (v_drop);
  end if;
  -- The wide columns, streamed from the arguments into the tables: one plan for
  -- every call (no join, nothing to estimate), never a copy of the arrays.
  perform set_config('plan_cache_mode', 'force_generic_plan', true);
  if v_new > 0 then
    insert into entries (tenant, pos, origin, lsn, idx, key, deleted, data, codec, vv, hlc,
                         fence, value_hash)
    select v_tenant, v_base + v_entry_pos[u.n], p_node, u.lsn, u.idx, u.key, u.deleted,
           u.data, u.codec, u.vv, u.hlc, coalesce(u.fence, 0), u.value_hash
    from unnest(p_lsn, p_idx, p_key, p_deleted, p_data, p_codec, p_vv, p_hlc, p_fence,
                p_value_hash) with ordinality
         as u(lsn, idx, key, deleted, data, codec, vv, hlc, fence, value_hash, n)
    where v_entry_pos[u.n] > 0;
    get diagnostics v_inserted = row_count;
    insert into siblings (tenant, key, origin, lsn, deleted, data, codec, vv, hlc, fence,
                          value_hash, value_json, pos)
    select v_tenant, u.key, p_node, u.lsn, u.deleted, u.data, u.codec, u.vv, u.hlc,
           coalesce(u.fence, 0), u.value_hash, u.value_json::jsonb,
           v_base + v_sibling_pos[u.n]
    from unnest(p_lsn, p_key, p_deleted, p_data, p_codec, p_vv, p_hlc, p_fence, p_value_hash,
                p_value_json) with ordinality
         as u(lsn, key, deleted, data, codec, vv, hlc, fence, value_hash, value_json, n)
    where v_sibling_pos[u.n] > 0;
    get diagnostics v_merged = row_count;
  end if;

  update nodes
     set acked_lsn = greatest(acked_lsn, coalesce(p_through_lsn, 0)),
         acked_hlc = greatest(acked_hlc, coalesce(v_max_hlc, 0)),
         last_push_at = now()
   where tenant = v_tenant and node_id = p_node
  returning acked_lsn into v_acked;

  if v_new = 0 then
    return jsonb_build_object('acked_lsn', v_acked, 'inserted', v_inserted,
                              'merged', v_merged,
                              'head', coalesce((select pos from head where tenant = v_tenant), 0),
                              'fenced', v_fenced);
  end if;
  -- Publish the head: the newest position below every other push in flight,
  -- read in this order (the sequence, then who is in flight), under the head
  -- row, held to commit: this push's positions become visible with it. A push
  -- is in flight while it holds its transaction id's lock: a committing one
  -- lets go of that (and is visible) before it lets go of its advisory locks,
  -- so marks still listed without it are a finished push's.
  select pos into v_head from head where tenant = v_tenant for update;
  v_last := pg_sequence_last_value(v_seq);
  with l as materialized (
    select virtualtransaction as vt, locktype, classid, objid, objsubid from pg_locks
    where pid <> pg_backend_pid()
      and (locktype = 'transactionid'
           or (locktype = 'advisory'
               and database = (select d.oid from pg_database d
                               where d.datname = current_database())))
  )
  select min((m.classid::bigint << 32) | m.objid::bigint) into v_inflight
  from l t join l m on m.vt = t.vt and m.locktype = 'advisory' and m.objsubid = 1
  where t.locktype = 'advisory' and t.objsubid = 2
    and t.classid = hashtext('walsync.inflight')::oid and t.objid = hashtext(v_tenant)::oid
    and exists (select from l x where x.vt = t.vt and x.locktype = 'transactionid');
  v_head := greatest(v_head, least(v_last, v_inflight - 1));
  update head set pos = v_head where tenant = v_tenant;
  return jsonb_build_object('acked_lsn', v_acked, 'inserted', v_inserted,
                            'merged', v_merged, 'head', v_head, 'fenced', v_fenced);
end
$$;

revoke all on all functions in schema walsync_api from public, anon, authenticated;
revoke all on all functions in schema walsync from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;
