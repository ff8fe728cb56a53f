-- walsync tenant mode: what 20261207000008_push_in_parallel.sql adds, for the
-- functions' owner (walsync_tenant_api). walsync.key_locks is a tenant's table
-- like the others: its key leads with the tenant (walsync.tenant_keys, called
-- by 20261207000107_tenant_policies.sql) and Row Level Security admits only the
-- caller's tenant's rows. Push draws positions from its tenant's sequence,
-- made by walsync.position_sequence (which grants a new one itself).
-- Safe to apply more than once.

do $$
begin
  execute 'alter table walsync.key_locks alter column tenant set default '
          'walsync.request_tenant()';
  execute 'drop policy if exists walsync_tenant on walsync.key_locks';
  execute 'create policy walsync_tenant on walsync.key_locks for all '
          'to authenticated, walsync_tenant_api '
          'using (tenant = (select walsync.request_tenant())) '
          'with check (tenant = (select walsync.request_tenant()))';
end
$$;

grant select, insert, update on walsync.key_locks to walsync_tenant_api;
-- the position sequences made before tenant mode was turned on
do $$
declare
  s regclass;
begin
  for s in select c.oid::regclass from pg_class c
           where c.relnamespace = 'walsync'::regnamespace and c.relkind = 'S'
             and c.relname ~ '^positions(_[0-9a-f]{32})?$'
  loop
    execute format('grant select, usage, update on sequence %s to walsync_tenant_api', s);
  end loop;
end
$$;
grant execute on function walsync.position_sequence(text) to walsync_tenant_api;
