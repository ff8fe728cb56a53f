-- walsync server: the nodes made visible (a label, the first push) and the entry
-- log read as of a point in time (its window, its pages up to a cut, the HLC of a
-- node's record), for `walsync nodes` and `walsync restore --at / --lsn`
-- (sync/PROTOCOL.md, "Nodes" and "Point-in-time restore").
--
-- No table is added: two columns of walsync.nodes (whose tenant column and
-- policy they share) and a trigger keeping one of them. push and pull are not
-- changed. Plain SQL. Safe to apply more than once.

-- label: a name a person gives the node (the host name by default: the client
-- sets it when its replicator connects, or `walsync nodes label`); first_push_at:
-- when the node's first push reached the server.
alter table walsync.nodes add column if not exists label text;
alter table walsync.nodes add column if not exists first_push_at timestamptz;

-- first_push_at is set by the first update that sets last_push_at (every push
-- does): a trigger whose WHEN is false for every later push, so push pays a
-- comparison, not a call.
create or replace function walsync.note_first_push() returns trigger
language plpgsql
set search_path = pg_catalog, walsync
as $$
begin
  new.first_push_at := new.last_push_at;
  return new;
end
$$;

-- nodes that pushed before this file: the time their oldest entry still held
-- was received (else their last push)
update walsync.nodes n
   set first_push_at = coalesce((select e.received_at from walsync.entries e
                                  where e.tenant = n.tenant and e.origin = n.node_id
                                  order by e.lsn limit 1), n.last_push_at)
 where n.first_push_at is null and n.last_push_at is not null;

drop trigger if exists nodes_first_push on walsync.nodes;
create trigger nodes_first_push before update of last_push_at on walsync.nodes
  for each row when (new.first_push_at is null and new.last_push_at is not null)
  execute function walsync.note_first_push();

-- Every node the server knows, with its label, push and pull times, acknowledged
-- LSN and its time, pull cursor and the runs it holds a live lease on; with the
-- server's clock (`now`, so a client says "3 s ago" by the server's time) and head
-- (a node's pull lag is head - pull_cursor).
create or replace function walsync_api.nodes()
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return jsonb_build_object(
    'now', now(),
    'head', coalesce((select pos from head where tenant = v_tenant), 0),
    'nodes', coalesce((
      select jsonb_agg(jsonb_build_object(
               'node_id', n.node_id, 'label', n.label, 'acked_lsn', n.acked_lsn,
               'acked_hlc', n.acked_hlc, 'pull_cursor', n.pull_cursor,
               'first_push_at', n.first_push_at, 'last_push_at', n.last_push_at,
               'last_pull_at', n.last_pull_at, 'claimed_at', n.claimed_at,
               'leases', coalesce(l.runs, '[]'::jsonb))
             order by n.node_id collate "C")
      from nodes n
      left join (select holder, jsonb_agg(run_id order by run_id collate "C") as runs
                 from leases where tenant = v_tenant and expires_at > now()
                 group by holder) l on l.holder = n.node_id
      where n.tenant = v_tenant), '[]'::jsonb));
end
$$;

-- Name a node (p_label null: no label). p_replace false keeps a label already
-- set (a replicator's default, the host name, never replaces one a person gave).
-- An unknown node is not created: `known` is false.
create or replace function walsync_api.node_label(p_node text, p_label text, p_replace boolean)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  v_label  text;
begin
  if p_label is not null and (p_label = '' or length(p_label) > 200) then
    raise exception 'a node label has 1 to 200 characters, not %', length(p_label)
      using errcode = '22023';
  end if;
  update nodes
     set label = case when coalesce(p_replace, true) or label is null then p_label
                      else label end
   where tenant = v_tenant and node_id = p_node
  returning label into v_label;
  return jsonb_build_object('node_id', p_node, 'known', found, 'label', v_label);
end
$$;

-- The point-in-time window: a cut at or after from_hlc is restored exactly from
-- the entries held (every entry with an HLC at or below it that reached the
-- server is here); to_hlc is the newest entry's. Both null while the log is
-- empty. The log is kept whole today, so from_hlc is its oldest entry's HLC;
-- a retention that compacts the log re-creates this function to name the
-- oldest cut it keeps exact.
create or replace function walsync_api.log_window()
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return (
    select jsonb_build_object('from_hlc', min(e.hlc), 'to_hlc', max(e.hlc),
                              'entries', count(*),
                              'head', coalesce((select pos from head where tenant = v_tenant),
                                               0))
    from entries e where e.tenant = v_tenant);
end
$$;

-- One page of the entry log as of a cut: the entries at positions (p_after,
-- next] whose HLC is at most p_upto_hlc and whose key starts with p_prefix, in
-- position order. A page reads at most p_limit positions through the position
-- index, matching or not, so every call costs alike; `next` is where the next
-- page starts and `head` the newest position.
create or replace function walsync_api.log_page(p_prefix text, p_upto_hlc bigint, p_after bigint,
                                                p_limit integer)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
  v_head   bigint;
  v_upper  bigint;
begin
  v_head := coalesce((select pos from head where tenant = v_tenant), 0);
  v_upper := least(v_head, greatest(p_after, 0) + greatest(p_limit, 1));
  return jsonb_build_object(
    'entries', coalesce((
      select jsonb_agg(jsonb_build_object(
               'pos', e.pos, 'origin', e.origin, 'lsn', e.lsn, 'idx', e.idx, 'key', e.key,
               'deleted', e.deleted, 'data', replace(encode(e.data, 'base64'), E'\n', ''),
               'codec', e.codec, 'vv', e.vv, 'hlc', e.hlc, 'fence', e.fence,
               'value_hash', e.value_hash) order by e.pos)
      from entries e
      where e.tenant = v_tenant and e.pos > p_after and e.pos <= v_upper
        and e.hlc <= p_upto_hlc and starts_with(e.key, coalesce(p_prefix, ''))), '[]'::jsonb),
    'next', greatest(v_upper, p_after),
    'head', v_head);
end
$$;

-- The HLC of a node's record on the server (null when the server holds no entry
-- of that LSN: a merge record, one not shipped, one fencing refused), with the
-- node's nearest LSNs it does hold below and above it (null: none).
create or replace function walsync_api.entry_point(p_node text, p_lsn bigint)
returns jsonb
language plpgsql security definer stable
set search_path = pg_catalog, walsync
as $$
declare
  v_tenant text := walsync.require_tenant();
begin
  return jsonb_build_object(
    'node_id', p_node, 'lsn', p_lsn,
    'hlc', (select max(e.hlc) from entries e
            where e.tenant = v_tenant and e.origin = p_node and e.lsn = p_lsn),
    'before', (select max(e.lsn) from entries e
               where e.tenant = v_tenant and e.origin = p_node and e.lsn < p_lsn),
    'after', (select min(e.lsn) from entries e
              where e.tenant = v_tenant and e.origin = p_node and e.lsn > p_lsn));
end
$$;

revoke all on all functions in schema walsync_api from public, anon, authenticated;
revoke all on all functions in schema walsync from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;
