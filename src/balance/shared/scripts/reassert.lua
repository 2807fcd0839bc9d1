-- ARGV: pool, epoch, agent, ttl_ms, view, max_n, n, then n pairs reg, ttl_ms (the
-- registrations the agent saw alive before the epoch changed), then entries of 4: kind, id,
-- a, b.
--   'L' id addr job    a lease the agent holds: recorded if missing (even above a limit: the
--                      request is running on that pod, the count must say so); `job`: the
--                      record of the asynchronous job it holds, or ''
--   'W' id stamp tried a waiter: queued again with its old arrival stamp if missing
--   'K' id - -         an acquire whose reply has not come: kept if present, not created
-- The list is the whole truth about the agent's ids in that pool up to `max_n`: any other of
-- them up to that number (a release that failed, a write lost in a failover) is dropped; its
-- ids in other pools are theirs to assert. An id released meanwhile (in `gone`) is not brought
-- back. Used after an epoch change or a reap-while-alive.
-- The registration is no longer pending (grants may resume once no other is), and the
-- registrations the agent knew of that have not re-asserted yet are added to those pending
-- (the agent that started the epoch may have known fewer, or nobody: then its young-Redis
-- hold ends here, replaced by the list).
-- Returns {'ok', hold_ms, {id, addr, ...}, over, {reg, ttl_ms, ...}} where the pairs are the
-- waiters ('W' or 'K') that hold a slot now, `over` the leases this call recorded above their
-- pod's limit, and the last list every live registration.
local agent = ARGV[3]
local reg = reg_of(agent, POOL)
if not epoch_is(ARGV[2]) then return {'epoch'} end
redis.call('ZADD', P .. 'agents', int(now_ms + tonumber(ARGV[4])), reg)
redis.call('HSET', P .. 'ttls', reg, ARGV[4])
set_view(reg, ARGV[5])
redis.call('SADD', P .. 'asserted', reg)
redis.call('ZREM', P .. 'pending', reg)
local n_regs = tonumber(ARGV[7])
add_pending(8, n_regs)
-- An agent that knew the live registrations has now named them all as pending: the guess
-- made by an agent that knew of nobody (the young-Redis hold) is no longer needed.
if n_regs > 0 then redis.call('HSET', P .. 'meta', 'hold_until', '0') end
reap()
local limits = {}
for _, p in ipairs(parse_view(ARGV[5])) do limits[p[1]] = p[2] end
local keep, waiters, over = {}, {}, 0
local last = tonumber(redis.call('HGET', P .. 'meta', 'last') or '0')
for i = 8 + 2 * n_regs, #ARGV, 4 do
  local kind, id, a, b = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  keep[id] = true
  local held = redis.call('HGET', P .. 'leases', id)
  local gone = redis.call('ZSCORE', P .. 'gone', id)
  if kind == 'L' then
    -- b: the record of the job the lease holds, if any. A job another agent adopted (this one
    -- was reaped while alive) is that agent's now.
    local adopted = b ~= '' and redis.call('HGET', P .. 'jobids', string.sub(b, 1, 32))
    local ended = b ~= '' and redis.call('ZSCORE', P .. 'jobdone', string.sub(b, 1, 32))
    if (adopted and adopted ~= id) or ended then
      -- Adopted by another agent while this one was reaped, or ended through another agent.
      keep[id] = nil
    elseif not held and not gone then
      drop(id)
      take(id, a, POOL, nil)
      local n = tonumber(redis.call('HGET', P .. 'inflight', a))
      if limits[a] and n > limits[a] then over = over + 1 end
    end
    if b ~= '' and not (adopted and adopted ~= id) and not ended and not gone then
      redis.call('HSET', P .. 'jobs', id, b)
      redis.call('HSET', P .. 'jobids', string.sub(b, 1, 32), id)
      -- Orphaned while this agent was reaped: its own again, not to be adopted.
      redis.call('SREM', P .. 'orphans:' .. POOL, id)
      redis.call('ZREM', P .. 'orphan_deadlines', id)
      redis.call('SADD', P .. 'own:' .. reg, id)
    end
  elseif not gone then
    waiters[#waiters + 1] = id
    if kind == 'W' and not held and not redis.call('ZSCORE', P .. 'queue', id) then
      enqueue(id, POOL, a, b)
      last = math.max(last, tonumber(a))
    end
  end
end
if over > 0 then redis.call('HINCRBY', P .. 'meta', 'over', over) end
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
return {'ok', hold_left(), granted, over, live_regs()}
