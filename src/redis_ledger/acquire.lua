-- ARGV: epoch, agent, ttl_ms, known, id, view ('-': unchanged), tried, max_waiting.
-- Takes a slot at once when nobody waits, else queues `id` by arrival and lets the pump hand
-- out whatever is free. Idempotent: a retry after a lost reply finds what the first try did.
-- Returns {'granted', addr} | {'queued', stamp, hold_ms} | {'full'} | {'epoch'} | {'reaped'}.
local agent, id, tried = ARGV[2], ARGV[5], ARGV[7]
if not epoch_is(ARGV[1]) then return {'epoch'} end
if not renew(agent, tonumber(ARGV[3]), ARGV[4]) then return {'reaped'} end
if ARGV[6] ~= '-' then redis.call('HSET', P .. 'views', agent, ARGV[6]) end
if reap() > 0 then pump(nil) end

local held = redis.call('HGET', P .. 'leases', id)
if held then return {'granted', held} end
local stamp = redis.call('ZSCORE', P .. 'queue', id)
if stamp then return {'queued', tonumber(stamp), hold_left()} end

local waiting = redis.call('ZCARD', P .. 'queue')
if waiting == 0 and hold_left() == 0 then
  local addr = pick(parse_view(redis.call('HGET', P .. 'views', agent)), parse_set(tried), {})
  if addr then
    take(id, addr, nil)
    return {'granted', addr}
  end
end
if waiting >= tonumber(ARGV[8]) then return {'full'} end

local s = math.max(now_us, tonumber(redis.call('HGET', P .. 'meta', 'last') or '0') + 1)
redis.call('HSET', P .. 'meta', 'last', int(s))
redis.call('ZADD', P .. 'queue', int(s), id)
if tried ~= '' then redis.call('HSET', P .. 'tried', id, tried) end
redis.call('SADD', P .. 'own:' .. agent, id)
pump(id)
held = redis.call('HGET', P .. 'leases', id)
if held then return {'granted', held} end
return {'queued', s, hold_left()}
