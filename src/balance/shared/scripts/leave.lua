-- ARGV: pool, id, tombstone_ms. A lease released or a waiter gone (timeout, client gone): its
-- slot goes to the oldest waiter (of any pool) that can use it. Every released id is
-- remembered as gone for `tombstone_ms`: after an epoch change the release can reach Redis
-- before the agent's re-assertion that still lists the id, and the re-assertion must not take
-- the slot again (nobody would ever release it). That holds whether the new ledger is empty
-- (a restart without persistence: the release finds nothing) or kept the old data (a failover
-- to a replica, a restart from a snapshot: the release finds the old lease). Ids are never
-- reused, so a tombstone cannot hide a live request.
-- Returns 'lease', 'waiter' or '' (unknown: already gone).
redis.call('ZREMRANGEBYSCORE', P .. 'gone', '-inf', int(now_ms))
local was = drop(ARGV[2])
redis.call('ZADD', P .. 'gone', int(now_ms + tonumber(ARGV[3])), ARGV[2])
local freed = reap()
if was == 'lease' or freed > 0 then pump(nil) end
return was or ''
