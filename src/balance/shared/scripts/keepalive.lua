-- ARGV: pool, epoch, agent, ttl_ms, known, view ('-': unchanged), then the ids the agent is
-- waiting for in that pool. Renews the agent's registration for the pool, reaps vanished ones,
-- pumps (ends a recovery hold, makes up for a lost wake-up) and reports which of the listed ids
-- hold a slot by now.
-- Returns {'ok', hold_ms, waiting, expired, {addr, n, ...}, {id, addr, ...}, {reg, ttl_ms,
-- ...}} | {'epoch'} | {'reaped'}: waiting and expired are the pool's, the counts those of the
-- pool's pods, the last list every live registration (whom a new epoch must wait for).
local reg = reg_of(ARGV[3], POOL)
if not epoch_is(ARGV[2]) then return {'epoch'} end
if not renew(reg, tonumber(ARGV[4]), ARGV[5]) then return {'reaped'} end
if ARGV[6] ~= '-' then set_view(reg, ARGV[6]) end
reap()
pump(nil)
local granted = {}
for i = 7, #ARGV do
  local addr = redis.call('HGET', P .. 'leases', ARGV[i])
  if addr then granted[#granted + 1] = ARGV[i]; granted[#granted + 1] = addr end
end
local s = pool_status(POOL)
return {'ok', hold_left(), s[1], s[2], s[3], granted, live_regs()}
