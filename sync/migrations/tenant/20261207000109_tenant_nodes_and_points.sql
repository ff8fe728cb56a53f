-- walsync tenant mode: the functions of 20261207000009_nodes_and_points.sql for
-- tenant-scoped keys, as 20261207000107_tenant_policies.sql does for the
-- others: owned by walsync_tenant_api (so Row Level Security applies to them)
-- and callable by authenticated. They read and write walsync.nodes, walsync.head,
-- walsync.leases and walsync.entries only, whose policies that file made; each
-- filters on the caller's tenant besides. Plain SQL. Safe to apply more than
-- once.

do $$
declare
  f text;
begin
  foreach f in array array[
    'walsync_api.nodes()',
    'walsync_api.node_label(text, text, boolean)',
    'walsync_api.log_window()',
    'walsync_api.log_page(text, bigint, bigint, integer)',
    'walsync_api.entry_point(text, bigint)']
  loop
    execute format('alter function %s owner to walsync_tenant_api', f);
    execute format('revoke all on function %s from public, anon', f);
    execute format('grant execute on function %s to authenticated, service_role', f);
  end loop;
end
$$;
