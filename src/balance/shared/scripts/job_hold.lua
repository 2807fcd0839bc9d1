-- ARGV: pool, lease id, job record ("<job hex> <deadline ms> <route>\n<status path>"). The
-- lease's request started an asynchronous job: from now on the lease is the job's, and
-- outlives its agent (reaping the agent moves it to orphans:<pool>, see reap). A job reported
-- done before this (its callback reached another agent first) holds nothing: 'done', and the
-- caller releases the lease. 'gone': the lease is not in this ledger (an epoch change; the
-- agent's re-assertion carries the record).
local id, rec = ARGV[2], ARGV[3]
local job = string.sub(rec, 1, 32)
redis.call('ZREMRANGEBYSCORE', P .. 'jobdone', '-inf', int(now_ms))
if redis.call('ZREM', P .. 'jobdone', job) == 1 then return 'done' end
if not redis.call('HGET', P .. 'leases', id) then return 'gone' end
redis.call('HSET', P .. 'jobs', id, rec)
redis.call('HSET', P .. 'jobids', job, id)
return 'held'
