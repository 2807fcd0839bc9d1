-- ARGV: pool, epoch, agent, ttl_ms, view, max_n, then entries of 4: kind, id, a, b.
--   'L' id addr -      a lease the agent holds: recorded if missing (even above a limit: the
--                      request is running on that pod, the count must say so)
--   'W' id stamp tried a waiter: queued again with its old arrival stamp if missing
--   'K' id - -         an acquire whose reply has not come: kept if present, not created
-- The list is the whole truth about the agent's ids in that pool up to `max_n`: any other of
-- them up to that number (a release that failed, a write lost in a failover) is dropped; its
-- ids in other pools are theirs to assert. Used after an epoch change or a reap-while-alive.
-- Returns {'ok', hold_ms, {id, addr, ...}} where the pairs are the waiters ('W' or 'K') that
-- hold a slot now.
local agent = ARGV[3]
local reg = reg_of(agent, POOL)
if not epoch_is(ARGV[2]) then return {'epoch'} end
redis.call('ZADD', P .. 'agents', int(now_ms + tonumber(ARGV[4])), reg)
redis.call('HSET', P .. 'meta', 'ttl', ARGV[4])
redis.call('HSET', P .. 'views', reg, ARGV[5])
reap()
local keep, waiters = {}, {}
local last = tonumber(redis.call('HGET', P .. 'meta', 'last') or '0')
for i = 7, #ARGV, 4 do
  local kind, id, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  keep[id] = true
  local held = redis.call('HGET', P .. 'leases', id)
  if kind == 'L' then
    if not held then
      drop(id)
      take(id, a, POOL, nil)
    end
  else
    waiters[#waiters + 1] = id
    if kind == 'W' and not held and not redis.call('ZSCORE', P .. 'queue', id) then
      enqueue(id, POOL, a, b)
      last = math.max(last, tonumber(a))
    end
  end
end
redis.call('HSET', P .. 'meta', 'last', int(last))
local max_n = tonumber(ARGV[6])
for _, id in ipairs(redis.call('SMEMBERS', P .. 'own:' .. reg)) do
  if not keep[id] and tonumber(string.match(id, '#(%d+)$')) <= max_n then drop(id) end
end
pump(nil)
local granted = {}
for _, id in ipairs(waiters) do
  local addr = redis.call('HGET', P .. 'leases', id)
  if addr then granted[#granted + 1] = id; granted[#granted + 1] = addr end
end
return {'ok', hold_left(), granted}
