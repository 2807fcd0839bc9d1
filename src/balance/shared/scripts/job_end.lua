-- ARGV: pool, job hex, tombstone_ms, remember_ms. Ends the hold of a job wherever it is (the
-- callback, a cancel or a final status can reach any agent): its lease is released as by
-- leave.lua. {'ended', pool}, or {'unknown'} when no lease holds the job. Either way the job is
-- remembered as done for `remember_ms`: a hold that comes after (a callback faster than the
-- 202's way back) does not start, and a holder's re-assertion does not bring it back.
local job = ARGV[2]
redis.call('ZREMRANGEBYSCORE', P .. 'jobdone', '-inf', int(now_ms))
redis.call('ZADD', P .. 'jobdone', int(now_ms + tonumber(ARGV[4])), job)
local id = redis.call('HGET', P .. 'jobids', job)
if id and redis.call('HGET', P .. 'leases', id) then
  redis.call('ZREMRANGEBYSCORE', P .. 'gone', '-inf', int(now_ms))
  local _, pool = drop(id)
  redis.call('ZADD', P .. 'gone', int(now_ms + tonumber(ARGV[3])), id)
  reap()
  pump(nil)
  return {'ended', pool}
end
return {'unknown'}
