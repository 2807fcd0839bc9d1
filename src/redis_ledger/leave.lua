-- ARGV: pool, id, tombstone_ms. A lease released or a waiter gone (timeout, client gone): its
-- slot goes to the oldest waiter (of any pool) that can use it. An id the ledger does not hold
-- is remembered as gone for `tombstone_ms`: after a Redis restart the release can reach the
-- new, empty ledger before the agent's re-assertion that still lists the id, and the
-- re-assertion must not take the slot again (nobody would ever release it).
-- Returns 'lease', 'waiter' or '' (unknown: already gone).
redis.call('ZREMRANGEBYSCORE', P .. 'gone', '-inf', int(now_ms))
local was = drop(ARGV[2])
if not was then redis.call('ZADD', P .. 'gone', int(now_ms + tonumber(ARGV[3])), ARGV[2]) end
local freed = reap()
if was == 'lease' or freed > 0 then pump(nil) end
return was or ''
