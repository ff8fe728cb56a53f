-- walsync server schema: the server's identity, node incarnations and
-- acknowledgements that never pass what the server holds.
--
--  * walsync.server holds one random server_id, made when the schema is first
--    migrated. A dump restored elsewhere keeps it (the same server, perhaps
--    behind); a database migrated anew has another. Clients keep it beside
--    their acknowledged LSN and re-ship everything to a different server.
--  * A node id is pushed under by one store at a time: its incarnation.
--    hello() claims the id with a fresh random token, given only to a caller
--    that shows the token the server holds (or, for a row never claimed,
--    none) and whose acknowledged LSN is not below the server's: a copy of a
--    store (cp -r, a disk image) cannot claim an id its original claimed
--    since, nor one whose server position is past its own. push_claimed()
--    refuses a push under another token ("taken"), and a push that does not
--    follow what the server holds of the node ("behind": the database was
--    restored from a backup, or is another one): its acknowledgement only
--    ever moves over entries it has. A refused caller takes a fresh node id
--    (a copy) or re-ships from the server's position (a server behind).
--  * node_entries() lists what the server holds of a node's LSNs (key, the
--    md5 of the stored bytes, HLC), so that a store can check that entries
--    above its own acknowledgement are its own before it adopts them.
-- The plain push keeps its arguments and results (older clients).
-- Safe to apply more than once.

create table if not exists walsync.server (
  id         smallint primary key default 1 check (id = 1),
  server_id  uuid not null default gen_random_uuid(),
  created_at timestamptz not null default now()
);
insert into walsync.server (id) values (1) on conflict do nothing;
alter table walsync.server enable row level security;
revoke all on walsync.server from public, anon, authenticated;

-- the token of the store incarnation that last claimed the node id (null: never claimed)
alter table walsync.nodes add column if not exists incarnation text;
alter table walsync.nodes add column if not exists claimed_at timestamptz;

-- Claim a node id (p_new_token) or, with p_new_token null, only ask whether the
-- caller still holds it. p_tokens: the tokens the caller claimed the id with,
-- newest first; p_acked_lsn: what the server acknowledged to it for this id;
-- p_base_lsn: LSNs at or below it are not the id's (a renewed id starts above
-- its fork), so the server holds them by construction. reason: null (claimed,
-- or still held), 'taken' (another incarnation holds the id) or 'ahead' (the
-- server holds entries of the id above the caller's acknowledgement: the caller
-- checks whether they are its own before adopting them).
create or replace function walsync_api.hello(p_node text, p_tokens jsonb, p_new_token text,
                                             p_acked_lsn bigint, p_base_lsn bigint)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_server uuid;
  v_row    nodes%rowtype;
  v_acked  bigint;
  v_reason text;
  v_head   bigint;
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
    insert into nodes (node_id, acked_lsn) values (p_node, greatest(coalesce(p_base_lsn, 0), 0))
    on conflict do nothing;
  end if;
  select * into v_row from nodes where node_id = p_node for update;
  v_acked := greatest(coalesce(v_row.acked_lsn, 0), coalesce(p_base_lsn, 0));
  if v_row.incarnation is not null
     and not (coalesce(p_tokens, '[]'::jsonb) ? v_row.incarnation) then
    v_reason := 'taken';
  elsif v_acked > coalesce(p_acked_lsn, 0) then
    v_reason := 'ahead';
  elsif p_new_token is not null then
    update nodes set incarnation = p_new_token, claimed_at = now(), acked_lsn = v_acked
     where node_id = p_node;
  end if;
  select pos into v_head from head where id = 1;
  return jsonb_build_object(
    'server_id', v_server, 'node_id', p_node, 'reason', v_reason,
    'claimed', v_reason is null and p_new_token is not null,
    'acked_lsn', v_acked, 'acked_hlc', coalesce(v_row.acked_hlc, 0),
    'head', coalesce(v_head, 0));
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
  v_server uuid;
  v_row    nodes%rowtype;
  v_acked  bigint;
  v_reason text;
  v_head   bigint;
begin
  if p_node is null or p_node = '' then
    raise exception 'push needs a node id' using errcode = '22023';
  end if;
  select server_id into v_server from server where id = 1;
  insert into nodes (node_id, acked_lsn) values (p_node, greatest(coalesce(p_base_lsn, 0), 0))
  on conflict do nothing;
  -- held to the end: a claim (hello) waits for this push, and this push for it
  select * into v_row from nodes where node_id = p_node for update;
  v_acked := greatest(v_row.acked_lsn, coalesce(p_base_lsn, 0));
  if p_incarnation is not null and v_row.incarnation is distinct from p_incarnation then
    v_reason := 'taken';
  elsif v_acked < coalesce(p_after_lsn, 0) then
    v_reason := 'behind';
  end if;
  if v_reason is not null then
    select pos into v_head from head where id = 1;
    return jsonb_build_object('refused', v_reason, 'acked_lsn', v_acked, 'inserted', 0,
                              'merged', 0, 'head', coalesce(v_head, 0), 'fenced', '[]'::jsonb,
                              'server_id', v_server);
  end if;
  if v_acked > v_row.acked_lsn then
    update nodes set acked_lsn = v_acked where node_id = p_node;
  end if;
  if coalesce(cardinality(p_lsn), 0) = 0 then
    -- records with nothing for the server (merges of pulled entries): acknowledged
    update nodes set acked_lsn = greatest(acked_lsn, coalesce(p_through_lsn, 0)),
                     last_push_at = now()
     where node_id = p_node
    returning acked_lsn into v_acked;
    select pos into v_head from head where id = 1;
    return jsonb_build_object('acked_lsn', v_acked, 'inserted', 0, 'merged', 0,
                              'head', coalesce(v_head, 0), 'fenced', '[]'::jsonb,
                              'server_id', v_server);
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
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  select jsonb_build_object('rows', coalesce(jsonb_agg(jsonb_build_object(
           'lsn', x.lsn, 'key', x.key, 'md5', x.md5, 'hlc', x.hlc)
           order by x.lsn, x.key collate "C"), '[]'::jsonb))
  from (select e.lsn, e.key, md5(e.data) as md5, e.hlc from walsync.entries e
        where e.origin = p_node and e.lsn > p_after and e.lsn <= p_upto
        union all
        select f.lsn, f.key, md5(f.data), null from walsync.fenced f
        where f.origin = p_node and f.lsn > p_after and f.lsn <= p_upto) x
$$;

revoke all on all functions in schema walsync_api from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;
