-- ARGV: pool, epoch, agent, ttl_ms, known, id, view ('-': unchanged), tried, max_waiting,
-- arrival (the stamp the request had when it first waited, before a retry; '0': none).
-- Takes a slot at once when nobody waits (in any pool), else queues `id` by arrival and lets
-- the pump hand out whatever is free. Refused ('full') when `max_waiting` requests of the pool
-- wait besides it. Idempotent: a retry after a lost reply finds what the first try did.
-- Returns {'granted', addr} | {'queued', stamp, hold_ms} | {'full'} | {'epoch'} | {'reaped'}.
local agent, id, tried = ARGV[3], ARGV[6], ARGV[8]
local reg = reg_of(agent, POOL)
if not epoch_is(ARGV[2]) then return {'epoch'} end
if not renew(reg, tonumber(ARGV[4]), ARGV[5]) then return {'reaped'} end
if ARGV[7] ~= '-' then set_view(reg, ARGV[7]) end
if reap() > 0 then pump(nil) end

local held = redis.call('HGET', P .. 'leases', id)
if held then return {'granted', held} end
local stamp = redis.call('ZSCORE', P .. 'queue', id)
if stamp then return {'queued', tonumber(stamp), hold_left()} end

local view = parse_view(redis.call('HGET', P .. 'views', reg))
local free = hold_left() == 0 and pick(view, parse_set(tried), {})
if free and redis.call('ZCARD', P .. 'queue') == 0 then
  take(id, free, POOL, nil)
  return {'granted', free}
end
-- Full when `max_waiting` of the pool wait, unless a pod of its own is free (older waiters of
-- other pools cannot use it): then the pump below may serve it at once.
local max_waiting = tonumber(ARGV[9])
if not free and pool_waiting(POOL) >= max_waiting then return {'full'} end

-- A retry keeps its place: the stamp it had (its first id left the queue when it was granted,
-- so no other waiter has it).
local s = tonumber(ARGV[10]) or 0
if s <= 0 then
  s = math.max(now_us, tonumber(redis.call('HGET', P .. 'meta', 'last') or '0') + 1)
  redis.call('HSET', P .. 'meta', 'last', int(s))
end
enqueue(id, POOL, int(s), tried)
pump(id)
held = redis.call('HGET', P .. 'leases', id)
if held then return {'granted', held} end
if pool_waiting(POOL) - 1 >= max_waiting then
  drop(id)
  return {'full'}
end
return {'queued', s, hold_left()}
