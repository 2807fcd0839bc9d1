-- ARGV: pool. Read only: {epoch or '', waiting, expired, {addr, n, ...}, oldest} of the pool,
-- for status and tests (see pool_status). `oldest`: how long (µs, Redis clock) the pool's
-- oldest waiter has waited, all agents together; -1 when none waits, or when none is found
-- among the queue's first 4096 waiters (other pools' ahead of it).
local s = pool_status(POOL)
local oldest = -1
if s[1] > 0 then
  local pos = 0
  while oldest < 0 and pos < 4096 do
    local ids = redis.call('ZRANGE', P .. 'queue', pos, pos + 63, 'WITHSCORES')
    if #ids == 0 then break end
    for i = 1, #ids, 2 do
      if redis.call('HGET', P .. 'pool', ids[i]) == POOL then
        oldest = math.max(0, math.floor(now_us - tonumber(ids[i + 1])))
        break
      end
    end
    pos = pos + 64
  end
end
return {redis.call('HGET', P .. 'meta', 'epoch') or '', s[1], s[2], s[3], oldest}
