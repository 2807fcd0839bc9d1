-- ARGV: pool (unused: the epoch is the whole ledger's), server run_id (read by the caller just
-- now), nonce, hold_ms.
-- Starts a new epoch when the ledger has none (fresh or restarted Redis) or its epoch was made
-- on another server (failover to a replica): grants then wait `hold_ms` so every live agent
-- re-asserts its leases before anyone is given a slot. Returns {epoch, hold left (ms)}.
local sid = ARGV[2]
local cur = redis.call('HGET', P .. 'meta', 'epoch')
if not cur or string.sub(cur, 1, #sid + 1) ~= sid .. '/' then
  cur = sid .. '/' .. ARGV[3]
  redis.call('HSET', P .. 'meta', 'epoch', cur, 'hold_until', int(now_ms + tonumber(ARGV[4])))
end
return {cur, hold_left()}
