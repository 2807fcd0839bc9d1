-- ARGV: pool (unused: the epoch is the whole ledger's), server run_id (read by the caller just
-- now), nonce, young_hold_ms, n, then n pairs reg, ttl_ms: the registrations the caller saw
-- alive in the ledger it knew before (its last keep-alive).
-- Starts a new epoch when the ledger has none (fresh or restarted Redis) or its epoch was made
-- on another server (failover to a replica). Grants then wait until each of those
-- registrations has re-asserted its leases and waiters, or has been silent for its lease_ttl
-- (see `pending`): no fixed timer, and a ledger whose agents all re-asserted serves at once.
-- A caller that knew of no registration (it has just started, or never reached the old
-- ledger) cannot tell a fresh Redis from a restarted one: it passes `young_hold_ms` (its
-- recovery_hold less the Redis server's uptime), so a Redis that has just come up waits that
-- long for replicas nobody knows of (or until an agent that knew them re-asserts and names
-- them), and a long-running one serves at once.
-- Returns {epoch, hold left (ms)}.
local sid = ARGV[2]
local cur = redis.call('HGET', P .. 'meta', 'epoch')
if not cur or string.sub(cur, 1, #sid + 1) ~= sid .. '/' then
  cur = sid .. '/' .. ARGV[3]
  local n = tonumber(ARGV[5])
  local hold = 0
  if n == 0 then hold = tonumber(ARGV[4]) end
  redis.call('DEL', P .. 'pending', P .. 'asserted')
  redis.call('HSET', P .. 'meta', 'epoch', cur, 'started', int(now_ms),
    'hold_until', int(now_ms + hold), 'over', '0')
  add_pending(6, n)
end
return {cur, hold_left()}
