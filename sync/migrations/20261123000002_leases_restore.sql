-- walsync server schema, version 2: lease functions (taking, renewing and
-- releasing leases with fencing tokens) and paged reads of the merged state
-- for restore.
-- Safe to apply more than once.

-- Take (or renew) the lease on a run. Expiry uses the database's clock, so
-- skewed host clocks cannot make two holders believe they own a run at once.
-- A new holder gets a strictly larger token; the same holder renewing keeps
-- its token.
create or replace function walsync_api.lease_acquire(p_run_id text, p_holder text,
                                                     p_ttl_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  l leases%rowtype;
begin
  if p_ttl_seconds is null or p_ttl_seconds <= 0 then
    raise exception 'lease TTL must be positive' using errcode = '22023';
  end if;
  select * into l from leases where run_id = p_run_id for update;
  if not found then
    insert into leases (run_id, holder, token, expires_at)
    values (p_run_id, p_holder, 1, now() + make_interval(secs => p_ttl_seconds))
    returning * into l;
    return jsonb_build_object('acquired', true, 'run_id', p_run_id, 'holder', l.holder,
                              'token', l.token, 'expires_at', l.expires_at, 'now', now());
  end if;
  if l.holder = p_holder or l.expires_at <= now() then
    update leases
       set holder = p_holder,
           token = case when l.holder = p_holder then l.token else l.token + 1 end,
           expires_at = now() + make_interval(secs => p_ttl_seconds),
           acquired_at = case when l.holder = p_holder then l.acquired_at else now() end
     where run_id = p_run_id
    returning * into l;
    return jsonb_build_object('acquired', true, 'run_id', p_run_id, 'holder', l.holder,
                              'token', l.token, 'expires_at', l.expires_at, 'now', now());
  end if;
  return jsonb_build_object('acquired', false, 'run_id', p_run_id, 'holder', l.holder,
                            'token', l.token, 'expires_at', l.expires_at, 'now', now());
end
$$;

-- Renew a lease held with this token; false when it was lost.
create or replace function walsync_api.lease_renew(p_run_id text, p_holder text, p_token bigint,
                                                   p_ttl_seconds double precision)
returns jsonb
language plpgsql security definer
set search_path = pg_catalog, walsync
as $$
declare
  l leases%rowtype;
begin
  update leases set expires_at = now() + make_interval(secs => p_ttl_seconds)
   where run_id = p_run_id and holder = p_holder and token = p_token
  returning * into l;
  if found then
    return jsonb_build_object('renewed', true, 'token', l.token, 'expires_at', l.expires_at);
  end if;
  select * into l from leases where run_id = p_run_id;
  return jsonb_build_object('renewed', false, 'holder', l.holder, 'token', l.token,
                            'expires_at', l.expires_at);
end
$$;

create or replace function walsync_api.lease_release(p_run_id text, p_holder text,
                                                     p_token bigint)
returns jsonb
language sql security definer
set search_path = pg_catalog, walsync
as $$
  with released as (
    update walsync.leases set expires_at = now()
     where run_id = p_run_id and holder = p_holder and token = p_token
    returning 1)
  select jsonb_build_object('released', exists (select 1 from released))
$$;

create or replace function walsync_api.leases(p_holder text)
returns jsonb
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  select coalesce(jsonb_agg(jsonb_build_object(
           'run_id', run_id, 'holder', holder, 'token', token, 'expires_at', expires_at,
           'live', expires_at > now()) order by run_id), '[]'::jsonb)
  from walsync.leases where p_holder is null or holder = p_holder
$$;

-- The merged state, one page of keys at a time in byte order, every stored
-- sibling included (tombstones too), for restore.
create or replace function walsync_api.state_page(p_prefix text, p_after_key text,
                                                  p_limit integer)
returns jsonb
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  with page as (
    select distinct key collate "C" as key
    from walsync.siblings
    where key collate "C" >= coalesce(p_prefix, '')
      and starts_with(key, coalesce(p_prefix, ''))
      and (p_after_key is null or key collate "C" > p_after_key collate "C")
    order by 1
    limit greatest(p_limit, 1)
  )
  select jsonb_build_object(
    'rows', coalesce((
      select jsonb_agg(jsonb_build_object(
               'key', s.key, 'origin', s.origin, 'lsn', s.lsn, 'deleted', s.deleted,
               'data', translate(encode(s.data, 'base64'), E'\n', ''), 'codec', s.codec,
               'vv', s.vv, 'hlc', s.hlc, 'fence', s.fence, 'value_hash', s.value_hash)
             order by s.key collate "C", s.origin collate "C", s.lsn)
      from walsync.siblings s join page p on s.key = p.key), '[]'::jsonb),
    'last_key', (select max(key collate "C") from page),
    'done', (select count(*) from page) < greatest(p_limit, 1))
$$;

revoke all on all functions in schema walsync_api from public, anon, authenticated;
revoke all on all functions in schema walsync from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;

create or replace function walsync_api.state_count(p_prefix text)
returns jsonb
language sql security definer stable
set search_path = pg_catalog, walsync
as $$
  select jsonb_build_object('keys', count(distinct key), 'bytes', coalesce(sum(length(data)), 0))
  from walsync.siblings where starts_with(key, coalesce(p_prefix, ''))
$$;

revoke all on all functions in schema walsync_api from public, anon, authenticated;
grant execute on all functions in schema walsync_api to service_role;
