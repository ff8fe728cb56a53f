-- walsync tenant mode: the tables and functions of
-- 20261207000010_scope_and_retention.sql for tenant-scoped keys, as
-- 20261207000107_tenant_policies.sql does for the others: the new tables'
-- tenant column defaults to the caller's tenant and their policy admits only its
-- rows; the functions are owned by walsync_tenant_api (so Row Level Security
-- applies to them) and callable by authenticated. Each tenant has its own scope
-- groups, retention window and compaction. Plain SQL. Safe to apply more than
-- once.

do $$
declare
  t text;
begin
  foreach t in array array['scope_groups', 'log_settings', 'collected'] loop
    execute format('alter table walsync.%I alter column tenant set default '
                   'walsync.request_tenant()', t);
    execute format('alter table walsync.%I enable row level security', t);
    execute format('drop policy if exists walsync_tenant on walsync.%I', t);
    execute format('create policy walsync_tenant on walsync.%I for all '
                   'to authenticated, walsync_tenant_api '
                   'using (tenant = (select walsync.request_tenant())) '
                   'with check (tenant = (select walsync.request_tenant()))', t);
  end loop;
end
$$;

grant select, insert, update, delete
  on walsync.scope_groups, walsync.log_settings, walsync.collected
  to walsync_tenant_api;
grant execute on function walsync.key_lane(text), walsync.scope_checked(text[]),
                          walsync.scope_prefixes(jsonb)
  to walsync_tenant_api;

do $$
declare
  f text;
begin
  foreach f in array array[
    'walsync_api.pull_scoped(text, bigint, integer, jsonb, text)',
    'walsync_api.pull_rows(text, bigint, integer, jsonb, text)',
    'walsync_api.scope_group(text, jsonb)',
    'walsync_api.scope_backfill(text, text, bigint, bigint, jsonb, text, integer)',
    'walsync_api.log_retention(double precision)',
    'walsync_api.compact_log()']
  loop
    execute format('alter function %s owner to walsync_tenant_api', f);
    execute format('revoke all on function %s from public, anon', f);
    execute format('grant execute on function %s to authenticated, service_role', f);
  end loop;
end
$$;
