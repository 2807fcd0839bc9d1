-- ARGV: pool, epoch, agent, ttl_ms, known, first n, max, tombstone_ms, then the n of ids an
-- earlier call may have adopted without its reply reaching the agent. Adopts up to `max` job
-- leases of the pool whose agent vanished: each becomes the lease "<agent>#<n>" of this agent
-- (n from `first n` on), with its job record, and the pod's count does not change — the job
-- never stopped holding its slot. The old id is remembered as gone, so the vanished agent, if
-- it was only stalled, cannot re-assert it.
-- Returns {'ok', {n, addr, record, ...}} (this call's and the earlier ones found) | {'epoch'} |
-- {'reaped'}.
local agent = ARGV[3]
local reg = reg_of(agent, POOL)
if not epoch_is(ARGV[2]) then return {'epoch'} end
if not renew(reg, tonumber(ARGV[4]), ARGV[5]) then return {'reaped'} end
if reap() > 0 then pump(nil) end
local n, max, adopted = tonumber(ARGV[6]), tonumber(ARGV[7]), {}
for i = 9, #ARGV do
  local id = agent .. '#' .. ARGV[i]
  local addr = redis.call('HGET', P .. 'leases', id)
  local rec = redis.call('HGET', P .. 'jobs', id)
  if addr and rec then
    adopted[#adopted + 1] = ARGV[i]
    adopted[#adopted + 1] = addr
    adopted[#adopted + 1] = rec
  end
end
local earlier = #adopted
for _, old in ipairs(redis.call('SMEMBERS', P .. 'orphans:' .. POOL)) do
  if #adopted - earlier >= 3 * max then break end
  redis.call('SREM', P .. 'orphans:' .. POOL, old)
  local addr = redis.call('HGET', P .. 'leases', old)
  local rec = redis.call('HGET', P .. 'jobs', old)
  if addr and rec then
    local id = agent .. '#' .. int(n)
    redis.call('HDEL', P .. 'leases', old)
    redis.call('HDEL', P .. 'pool', old)
    redis.call('HDEL', P .. 'jobs', old)
    redis.call('ZREM', P .. 'orphan_deadlines', old)
    redis.call('HSET', P .. 'leases', id, addr)
    redis.call('HSET', P .. 'pool', id, POOL)
    redis.call('HSET', P .. 'jobs', id, rec)
    redis.call('HSET', P .. 'jobids', string.sub(rec, 1, 32), id)
    redis.call('SADD', P .. 'own:' .. reg, id)
    redis.call('ZADD', P .. 'gone', int(now_ms + tonumber(ARGV[8])), old)
    adopted[#adopted + 1] = int(n)
    adopted[#adopted + 1] = addr
    adopted[#adopted + 1] = rec
    n = n + 1
  end
end
return {'ok', adopted}
