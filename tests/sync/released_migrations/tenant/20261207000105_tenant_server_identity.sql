-- walsync tenant mode: the tenant-mode twins of 20261207000005_server_identity.sql
-- (hello, push_claimed, node_entries), each query confined to the caller's tenant
-- as in 20261123000101_tenant_mode.sql: node ids, incarnations and
-- acknowledgements are per tenant; the server's id is the database's, shared.
-- The twins are owned by walsync_tenant_api (Row Level Security applies to them)
-- and callable by tenant-scoped keys. Plain SQL. Safe to apply more than once.

-- the server's id is no tenant's secret: the twins' owner may read it
grant select on walsync.server to walsync_tenant_api;
drop policy if exists walsync_server_read on walsync.server;
create policy walsync_server_read on walsync.server for select to walsync_tenant_api
  using (true);

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

do $$
declare
  f text;
begin
  foreach f in array array[
    'walsync_api.hello(text, jsonb, text, bigint, bigint)',
    'walsync_api.push_claimed(text, text, bigint, bigint, bigint, bigint[], integer[], '
      'text[], boolean[], bytea[], smallint[], jsonb[], bigint[], bigint[], text[], text[])',
    'walsync_api.node_entries(text, bigint, bigint)']
  loop
    execute format('alter function %s owner to walsync_tenant_api', f);
    execute format('revoke all on function %s from public, anon', f);
    execute format('grant execute on function %s to authenticated, service_role', f);
  end loop;
end
$$;
