-- ARGV: epoch, agent, ttl_ms, known, view ('-': unchanged), then the ids the agent is waiting
-- for. Renews the agent's leases, reaps vanished agents, pumps (ends a recovery hold, makes up
-- for a lost wake-up) and reports which of the listed ids hold a slot by now.
-- Returns {'ok', hold_ms, waiting, expired, {addr, n, ...}, {id, addr, ...}} | {'epoch'} |
-- {'reaped'}.
local agent = ARGV[2]
if not epoch_is(ARGV[1]) then return {'epoch'} end
if not renew(agent, tonumber(ARGV[3]), ARGV[4]) then return {'reaped'} end
if ARGV[5] ~= '-' then redis.call('HSET', P .. 'views', agent, ARGV[5]) end
reap()
pump(nil)
local granted = {}
for i = 6, #ARGV do
  local addr = redis.call('HGET', P .. 'leases', ARGV[i])
  if addr then granted[#granted + 1] = ARGV[i]; granted[#granted + 1] = addr end
end
return {'ok', hold_left(), redis.call('ZCARD', P .. 'queue'),
  tonumber(redis.call('HGET', P .. 'meta', 'expired') or '0'),
  redis.call('HGETALL', P .. 'inflight'), granted}
