-- Shared by every ledger script (prepended to each one). KEYS[1] is the queue's key prefix,
-- "lb:{<queue>}:"; every key used is that prefix plus a suffix, so a queue's keys share one
-- hash slot. Keys of a queue:
--   meta        HASH  epoch ("<server run_id>/<nonce>"), hold_until (ms), last (last arrival
--                     stamp, µs), expired (leases returned because their agent vanished)
--   agents      ZSET  agent -> expiry of that agent's leases (ms, Redis clock)
--   views       HASH  agent -> "addr=limit,addr=limit": the pods that agent may send to
--   inflight    HASH  addr -> slots taken on that pod, all agents together
--   leases      HASH  id -> addr
--   queue       ZSET  id -> arrival stamp (µs, Redis clock, strictly increasing)
--   tried       HASH  id -> "addr,addr": pods a waiter must not be given
--   own:<agent> SET   that agent's ids (leases and waiters), so they can be reaped
-- An id is "<agent>#<n>": its owner is the text before the last '#'.
-- Redis < 7 replicates scripts verbatim unless told to replicate their effects, and TIME
-- makes a script non-deterministic; from Redis 7 on this is the default and the call a no-op.
if redis.replicate_commands then redis.replicate_commands() end
local P = KEYS[1]
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)

-- Lua 5.1 prints big numbers in %.14g: write stamps and times with every digit.
local function int(x) return string.format('%.0f', x) end

local function owner(id) return string.match(id, '^(.*)#[^#]*$') end

local function parse_set(s)
  local set = {}
  if s then for x in string.gmatch(s, '[^,]+') do set[x] = true end end
  return set
end

local function parse_view(s)
  local v = {}
  if s then
    for a, l in string.gmatch(s, '([^,=]+)=(%d+)') do v[#v + 1] = {a, tonumber(l)} end
  end
  return v
end

local function hold_left()
  return math.max(0, tonumber(redis.call('HGET', P .. 'meta', 'hold_until') or '0') - now_ms)
end

-- The least loaded pod of `view` below its limit and not in `tried` (ties: first listed).
-- `counts` caches inflight reads within one script run.
local function pick(view, tried, counts)
  local best, best_n
  for _, p in ipairs(view) do
    local a = p[1]
    if not tried[a] then
      local n = counts[a]
      if n == nil then
        n = tonumber(redis.call('HGET', P .. 'inflight', a) or '0')
        counts[a] = n
      end
      if n < p[2] and (best_n == nil or n < best_n) then best, best_n = a, n end
    end
  end
  return best
end

local function take(id, addr, counts)
  redis.call('HSET', P .. 'leases', id, addr)
  local n = redis.call('HINCRBY', P .. 'inflight', addr, 1)
  if counts then counts[addr] = n end
  redis.call('SADD', P .. 'own:' .. owner(id), id)
end

-- Removes `id` whatever it is; says what it was ('lease', 'waiter' or false).
local function drop(id)
  redis.call('SREM', P .. 'own:' .. owner(id), id)
  local addr = redis.call('HGET', P .. 'leases', id)
  if addr then
    redis.call('HDEL', P .. 'leases', id)
    if redis.call('HINCRBY', P .. 'inflight', addr, -1) <= 0 then
      redis.call('HDEL', P .. 'inflight', addr)
    end
    return 'lease'
  end
  if redis.call('ZREM', P .. 'queue', id) == 1 then
    redis.call('HDEL', P .. 'tried', id)
    return 'waiter'
  end
  return false
end

-- When no script ran on this queue for over half a lease (Redis hung, or no agent could reach
-- it), no agent could renew: the lost time is added to every agent's expiry instead of
-- reaping them all at once, which would give their slots away before they re-assert.
local function forgive()
  local seen = tonumber(redis.call('HGET', P .. 'meta', 'seen') or '0')
  local ttl = tonumber(redis.call('HGET', P .. 'meta', 'ttl') or '0')
  redis.call('HSET', P .. 'meta', 'seen', int(now_ms))
  local gap = now_ms - seen
  if seen > 0 and gap > ttl / 2 then
    local flat = redis.call('ZRANGE', P .. 'agents', 0, -1, 'WITHSCORES')
    for i = 1, #flat, 2 do
      redis.call('ZADD', P .. 'agents', int(tonumber(flat[i + 1]) + gap), flat[i])
    end
  end
end

-- Agents that stopped renewing for lease_ttl are gone (kill -9, node lost): their slots come
-- back and their waiters leave. Done inside every script, so no janitor is needed.
local function reap()
  forgive()
  local freed = 0
  for _, a in ipairs(redis.call('ZRANGEBYSCORE', P .. 'agents', '-inf', int(now_ms))) do
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'own:' .. a)) do
      if drop(id) == 'lease' then freed = freed + 1 end
    end
    redis.call('DEL', P .. 'own:' .. a)
    redis.call('HDEL', P .. 'views', a)
    redis.call('ZREM', P .. 'agents', a)
  end
  if freed > 0 then redis.call('HINCRBY', P .. 'meta', 'expired', freed) end
  return freed
end

-- Gives free slots to waiters, oldest first. A waiter none of whose pods is free is passed
-- over, not a barrier: a younger one that can use the free pod gets it. Stops as soon as no
-- agent's view has a free pod. Each grant is published to its agent, except `quiet` (the
-- caller, who reads it from the reply). Nothing is granted during a recovery hold.
local function pump(quiet)
  if hold_left() > 0 then return end
  local views, counts, none = {}, {}, {}
  local flat = redis.call('HGETALL', P .. 'views')
  for i = 1, #flat, 2 do views[flat[i]] = parse_view(flat[i + 1]) end
  local open, n_open
  local function refresh()
    open, n_open = {}, 0
    for a, v in pairs(views) do
      if pick(v, none, counts) then open[a], n_open = true, n_open + 1 end
    end
  end
  refresh()
  local pos = 0 -- waiters passed over so far (granted ones leave the ZSET)
  while n_open > 0 do
    local ids = redis.call('ZRANGE', P .. 'queue', pos, pos + 63)
    if #ids == 0 then return end
    for _, id in ipairs(ids) do
      local a = owner(id)
      local addr = open[a] and pick(views[a], parse_set(redis.call('HGET', P .. 'tried', id)), counts)
      if addr then
        redis.call('ZREM', P .. 'queue', id)
        redis.call('HDEL', P .. 'tried', id)
        take(id, addr, counts)
        if id ~= quiet then redis.call('PUBLISH', 'lb:grant:' .. a, id .. ' ' .. addr) end
        refresh()
        if n_open == 0 then return end
      else
        pos = pos + 1
      end
    end
  end
end

-- Renews `agent` (ARGV order is the caller's). Returns false when the agent believed it was
-- registered (`known`) and is not: it was reaped while alive and must re-assert.
local function renew(agent, ttl_ms, known)
  if known == '1' and not redis.call('ZSCORE', P .. 'agents', agent) then return false end
  redis.call('ZADD', P .. 'agents', int(now_ms + ttl_ms), agent)
  redis.call('HSET', P .. 'meta', 'ttl', int(ttl_ms))
  return true
end

local function epoch_is(e) return redis.call('HGET', P .. 'meta', 'epoch') == e end
