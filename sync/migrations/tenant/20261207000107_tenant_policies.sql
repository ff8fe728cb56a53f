-- walsync tenant mode (optional): every row belongs to a tenant, named by a
-- claim of the caller's JWT, and a tenant-scoped key (role authenticated with
-- that claim) reads and writes only its own tenant's rows through the same
-- walsync_api functions. Applied by `walsync migrate --tenant-mode`, never by
-- a plain `walsync migrate`.
--
-- The functions are the default files' (one definition each): they always
-- filter on walsync.request_tenant(), which is '' until this file inserts
-- tenant mode's setting. This file adds only what tenant mode needs beyond
-- that: the setting, keys that lead with the tenant, Row Level Security
-- policies, grants, the functions' owner and the tenant columns' default. Two
-- layers keep tenants apart, so that a single mistake cannot leak:
--  1. every query of every function filters on the caller's tenant
--     (walsync.require_tenant(), computed once per call);
--  2. those functions are SECURITY DEFINER owned by walsync_tenant_api, a role
--     that is neither a superuser, nor BYPASSRLS, nor the tables' owner: Row
--     Level Security applies to their queries, and its policies admit only
--     the caller's tenant's rows.
-- Callers that may already read every row directly (superusers, BYPASSRLS
-- roles such as service_role, the tables' owner) act on the default tenant ''
-- unless their JWT carries the claim, so existing workers keep working and the
-- rows held before tenant mode stay theirs.
--
-- A default file's closing REVOKE takes back what this file grants
-- `authenticated`, so `walsync migrate` applies this file again after any
-- default file it applies. Plain SQL, no psql meta-commands (usable with the
-- Supabase CLI). Safe to apply more than once.

do $$
begin
  if not exists (select from pg_roles where rolname = 'walsync_tenant_api') then
    create role walsync_tenant_api nologin noinherit nobypassrls;
  end if;
  -- ALTER ... OWNER TO needs the migrating role to be able to become the new owner
  if not pg_has_role(current_user, 'walsync_tenant_api', 'MEMBER') then
    execute format('grant walsync_tenant_api to %I', current_user);
  end if;
end
$$;

-- Tenant mode on, with the default claim (`walsync migrate --tenant-claim NAME`
-- sets another).
insert into walsync.tenant_settings (id) values (1) on conflict do nothing;

-- Every key leads with the tenant: a tenant's rows are adjacent, so what it
-- reads (pulls, state pages, conflicts) touches no other tenant's.
select walsync.tenant_keys(true);

-- Row Level Security keyed on the caller's tenant, for the functions' owner and
-- for authenticated (which holds no table privilege: the policy is what a
-- stray GRANT would still meet). A row written without naming its tenant is
-- the caller's (the functions always name it).
do $$
declare
  t text;
begin
  foreach t in array array['nodes', 'head', 'entries', 'siblings', 'leases', 'fenced'] loop
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

-- the server's id is no tenant's secret: the functions' owner may read it
grant select on walsync.server to walsync_tenant_api;
drop policy if exists walsync_server_read on walsync.server;
create policy walsync_server_read on walsync.server for select to walsync_tenant_api
  using (true);

-- What the functions' owner may touch (RLS still narrows it).
grant usage on schema walsync to walsync_tenant_api;
grant usage, create on schema walsync_api to walsync_tenant_api;
grant select, insert, update, delete
  on walsync.nodes, walsync.head, walsync.entries, walsync.siblings, walsync.leases,
     walsync.fenced
  to walsync_tenant_api;
grant execute on function walsync.request_tenant(), walsync.require_tenant(),
                          walsync.run_of(text), walsync.vv_leq(jsonb, jsonb)
  to walsync_tenant_api;
-- the policies call it as the querying role
grant execute on function walsync.request_tenant() to authenticated;

-- The API functions a tenant-scoped key may call, by signature: owned by
-- walsync_tenant_api (so RLS applies to them) and callable by authenticated.
-- A function this list does not name (tenants(), or one a later default file
-- adds) stays the service role's alone.
do $$
declare
  f text;
begin
  foreach f in array array[
    'walsync_api.push(text, bigint, bigint[], integer[], text[], boolean[], bytea[], '
      'smallint[], jsonb[], bigint[], bigint[], text[], text[])',
    'walsync_api.push(text, bigint, jsonb)',
    'walsync_api.pull(text, bigint, integer)',
    'walsync_api.node_status(text)',
    'walsync_api.head()',
    'walsync_api.conflicts(text, integer)',
    'walsync_api.lease_acquire(text, text, double precision)',
    'walsync_api.lease_renew(text, text, bigint, double precision)',
    'walsync_api.lease_release(text, text, bigint)',
    'walsync_api.leases(text)',
    'walsync_api.state_page(text, text, integer)',
    'walsync_api.state_count(text)',
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

revoke all on function walsync_api.tenants() from public, anon, authenticated;
grant execute on function walsync_api.tenants() to service_role;
grant usage on schema walsync_api to authenticated, service_role;
