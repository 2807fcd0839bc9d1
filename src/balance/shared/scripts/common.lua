-- Shared by every ledger script (prepended to each one). KEYS[1] is the ledger's key prefix,
-- "lb:{ledger}:", one for all pools: a pod reached by two pools (overlapping endpoint lists,
-- two routes, a pool and its replacement after a reload) has one count and one cap, and the
-- queue is one FIFO across pools, as in the in-process ledger. Every key is that prefix plus a
-- suffix, so all share one hash slot. ARGV[1] is always the pool the call is about. Keys:
--   meta        HASH  epoch ("<server run_id>/<nonce>"), started (ms, when the epoch began),
--                     hold_until (ms), last (last arrival stamp, µs), seen (last script run,
--                     ms), over (leases re-asserted above their pod's limit, this epoch)
--   pending     ZSET  reg -> deadline (ms): registrations alive in the previous epoch that have
--                     not re-asserted in this one; no slot is granted while one is left. A reg
--                     that stays silent until its deadline (epoch start + its lease_ttl) is
--                     taken as gone, by the rule that reaps a vanished agent
--   asserted    SET   regs that re-asserted in this epoch (never pending again)
--   ttls        HASH  reg -> its agent's lease_ttl (ms)
--   gone        ZSET  id -> expiry (ms): ids released lately (a release can reach a new epoch
--                     before its agent's re-assertion does); a re-assertion never brings such
--                     an id back
--   expired     HASH  pool -> leases of that pool returned because their agent vanished
--   agents      ZSET  reg -> expiry of that registration's leases (ms, Redis clock); a reg is
--                     "<agent>|<pool>": an agent registers (and is reaped) per pool it uses
--   views       HASH  reg -> "addr=limit,addr=limit": the pods that agent may send to for that
--                     pool (a waiter is only given a pod of its own reg's view)
--   viewv       HASH  reg -> the version of its view: an older one is never written over it
--   inflight    HASH  addr -> slots taken on that pod, all agents and all pools together
--   leases      HASH  id -> addr
--   pool        HASH  id -> pool of that lease or waiter
--   queue       ZSET  id -> arrival stamp (µs, Redis clock, strictly increasing), all pools
--   waiting     HASH  pool -> waiters of that pool in `queue` (for max_waiting and status)
--   tried       HASH  id -> "addr,addr": pods a waiter must not be given
--   own:<reg>   SET   that registration's ids (leases and waiters), so they can be reaped
--   jobs        HASH  id -> "<job hex> <deadline ms> <route>\n<status path>": a lease an
--                     asynchronous job holds (after its 202); reaping its agent does not free
--                     it but moves it to orphans:<pool>, for another agent to adopt
--   jobids      HASH  job hex -> the id of the lease it holds (a callback names the job)
--   jobdone     ZSET  job hex -> expiry (ms): jobs reported done before their hold was known
--   orphans:<pool> SET job leases whose agent vanished, waiting for an agent of the pool
--   orphan_deadlines ZSET id -> the job's deadline (ms): an orphan nobody adopted by then (no
--                     agent has its asynchronous route any more) is freed
-- An id is "<agent>#<n>": its owner is the text before the last '#'.
-- Redis < 7 replicates scripts verbatim unless told to replicate their effects, and TIME
-- makes a script non-deterministic; from Redis 7 on this is the default and the call a no-op.
if redis.replicate_commands then redis.replicate_commands() end
local P = KEYS[1]
local POOL = ARGV[1]
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now_us / 1000)

-- Lua 5.1 prints big numbers in %.14g: write stamps and times with every digit.
local function int(x) return string.format('%.0f', x) end

local function owner(id) return string.match(id, '^(.*)#[^#]*$') end

local function reg_of(agent, pool) return agent .. '|' .. pool end

-- The pool of a registration (agents have no '|', pools may).
local function reg_pool(reg) return string.sub(reg, (string.find(reg, '|', 1, true) or 0) + 1) end

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

-- Writes registration `reg`'s view from the argument `arg`, "<version>;addr=limit,…", unless
-- the one held is newer: an agent's calls come from several tasks and may arrive out of order,
-- and an older view may still list a pod the agent has removed.
local function set_view(reg, arg)
  local sep = string.find(arg, ';', 1, true)
  local version, view = 0, arg
  if sep then version, view = tonumber(string.sub(arg, 1, sep - 1)) or 0, string.sub(arg, sep + 1) end
  if version < tonumber(redis.call('HGET', P .. 'viewv', reg) or '0') then return end
  redis.call('HSET', P .. 'views', reg, view)
  redis.call('HSET', P .. 'viewv', reg, int(version))
end

-- How long grants still wait after an epoch change: until every registration pending in
-- `pending` has re-asserted or passed its deadline, and until `hold_until` (a new epoch
-- started by an agent that knew of no other replica, on a Redis that has just started).
-- 0: grants go on.
local function hold_left()
  redis.call('ZREMRANGEBYSCORE', P .. 'pending', '-inf', int(now_ms))
  local left = math.max(0, tonumber(redis.call('HGET', P .. 'meta', 'hold_until') or '0') - now_ms)
  local first = redis.call('ZRANGE', P .. 'pending', 0, 0, 'WITHSCORES')
  if #first > 0 then left = math.max(left, tonumber(first[2]) - now_ms) end
  return left
end
-- Marks registrations (flat list reg, ttl_ms, reg, ttl_ms, ... in ARGV from index `from`, `n`
-- pairs) as pending re-assertion in this epoch, unless they re-asserted already or their
-- deadline (epoch start + ttl) has passed.
local function add_pending(from, n)
  local started = tonumber(redis.call('HGET', P .. 'meta', 'started') or '0')
  for i = from, from + 2 * n - 1, 2 do
    local r, deadline = ARGV[i], started + tonumber(ARGV[i + 1])
    if deadline > now_ms and redis.call('SISMEMBER', P .. 'asserted', r) == 0 then
      local cur = redis.call('ZSCORE', P .. 'pending', r)
      if not cur or tonumber(cur) < deadline then
        redis.call('ZADD', P .. 'pending', int(deadline), r)
      end
    end
  end
end
-- Every live registration with its lease_ttl, flat: {reg, ttl_ms, ...}, those still pending
-- re-assertion included (a second restart before they re-asserted must wait for them too).
-- Agents keep the last list they read, to say whom a new epoch must wait for.
local function live_regs()
  local out, seen = {}, {}
  for _, r in ipairs(redis.call('ZRANGE', P .. 'agents', 0, -1)) do
    seen[r] = true
    out[#out + 1] = r
    out[#out + 1] = redis.call('HGET', P .. 'ttls', r) or '0'
  end
  local started = tonumber(redis.call('HGET', P .. 'meta', 'started') or '0')
  local flat = redis.call('ZRANGE', P .. 'pending', 0, -1, 'WITHSCORES')
  for i = 1, #flat, 2 do
    if not seen[flat[i]] then
      out[#out + 1] = flat[i]
      out[#out + 1] = int(tonumber(flat[i + 1]) - started)
    end
  end
  return out
end

local function pool_waiting(pool)
  return tonumber(redis.call('HGET', P .. 'waiting', pool) or '0')
end

local function count_waiting(pool, d)
  if redis.call('HINCRBY', P .. 'waiting', pool, d) <= 0 then
    redis.call('HDEL', P .. 'waiting', pool)
  end
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

-- Records `id` (of `pool`) as holding a slot on `addr`.
local function take(id, addr, pool, counts)
  redis.call('HSET', P .. 'leases', id, addr)
  redis.call('HSET', P .. 'pool', id, pool)
  local n = redis.call('HINCRBY', P .. 'inflight', addr, 1)
  if counts then counts[addr] = n end
  redis.call('SADD', P .. 'own:' .. reg_of(owner(id), pool), id)
end

-- Queues `id` of `pool` with arrival stamp `stamp`.
local function enqueue(id, pool, stamp, tried)
  redis.call('ZADD', P .. 'queue', stamp, id)
  redis.call('HSET', P .. 'pool', id, pool)
  if tried ~= '' then redis.call('HSET', P .. 'tried', id, tried) end
  redis.call('SADD', P .. 'own:' .. reg_of(owner(id), pool), id)
  count_waiting(pool, 1)
end

-- Takes waiter `id` of `pool` out of the queue (granted or gone). False if it was not there.
local function unqueue(id, pool)
  if redis.call('ZREM', P .. 'queue', id) == 0 then return false end
  redis.call('HDEL', P .. 'tried', id)
  count_waiting(pool, -1)
  return true
end

-- Removes `id` whatever it is; says what it was ('lease', 'waiter' or false) and its pool.
local function drop(id)
  local pool = redis.call('HGET', P .. 'pool', id)
  if not pool then return false end
  redis.call('HDEL', P .. 'pool', id)
  redis.call('SREM', P .. 'own:' .. reg_of(owner(id), pool), id)
  local addr = redis.call('HGET', P .. 'leases', id)
  if addr then
    local job = redis.call('HGET', P .. 'jobs', id)
    if job then
      redis.call('HDEL', P .. 'jobs', id)
      if redis.call('HGET', P .. 'jobids', string.sub(job, 1, 32)) == id then
        redis.call('HDEL', P .. 'jobids', string.sub(job, 1, 32))
      end
      redis.call('SREM', P .. 'orphans:' .. pool, id)
      redis.call('ZREM', P .. 'orphan_deadlines', id)
    end
    redis.call('HDEL', P .. 'leases', id)
    if redis.call('HINCRBY', P .. 'inflight', addr, -1) <= 0 then
      redis.call('HDEL', P .. 'inflight', addr)
    end
    return 'lease', pool
  end
  if unqueue(id, pool) then return 'waiter', pool end
  return false, pool
end

-- When no script ran for over half a lease (Redis hung, or no agent could reach it), no agent
-- could renew: the lost time is added to every registration's expiry instead of reaping them
-- all at once, which would give their slots away before they re-assert.
-- The shortest lease_ttl of the live registrations decides (during a rollout that changes
-- lease_ttl, the agents with the shorter one are the first a stall would wrongly reap).
local function forgive()
  local seen = tonumber(redis.call('HGET', P .. 'meta', 'seen') or '0')
  local ttl
  for _, v in ipairs(redis.call('HVALS', P .. 'ttls')) do
    local x = tonumber(v)
    if ttl == nil or x < ttl then ttl = x end
  end
  redis.call('HSET', P .. 'meta', 'seen', int(now_ms))
  local gap = now_ms - seen
  if ttl and seen > 0 and gap > ttl / 2 then
    local flat = redis.call('ZRANGE', P .. 'agents', 0, -1, 'WITHSCORES')
    for i = 1, #flat, 2 do
      redis.call('ZADD', P .. 'agents', int(tonumber(flat[i + 1]) + gap), flat[i])
    end
  end
end

-- Registrations not renewed for lease_ttl are gone (kill -9, node lost): their slots come back
-- and their waiters leave. Done inside every script, so no janitor is needed.
local function reap()
  forgive()
  local freed = 0
  -- Frees `id` as a slot its agent can no longer give back, and counts it.
  local function expire(id)
    local was, pool = drop(id)
    if was == 'lease' then
      freed = freed + 1
      redis.call('HINCRBY', P .. 'expired', pool, 1)
    end
  end
  for _, r in ipairs(redis.call('ZRANGEBYSCORE', P .. 'agents', '-inf', int(now_ms))) do
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'own:' .. r)) do
      local job = redis.call('HGET', P .. 'jobs', id)
      if job then
        -- The job goes on on its pod, and so does its hold: another agent adopts it.
        redis.call('SADD', P .. 'orphans:' .. reg_pool(r), id)
        local deadline = tonumber(string.match(job, '^%x+ (%d+) ') or '0')
        redis.call('ZADD', P .. 'orphan_deadlines', int(deadline), id)
      else
        expire(id)
      end
    end
    redis.call('DEL', P .. 'own:' .. r)
    redis.call('HDEL', P .. 'views', r)
    redis.call('HDEL', P .. 'viewv', r)
    redis.call('HDEL', P .. 'ttls', r)
    redis.call('ZREM', P .. 'agents', r)
  end
  -- Orphaned jobs past their max_duration that no agent adopted: nobody would end them.
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', P .. 'orphan_deadlines', '-inf', int(now_ms))) do
    redis.call('ZREM', P .. 'orphan_deadlines', id)
    expire(id)
  end
  return freed
end

-- Gives free slots to waiters, oldest first across all pools. A waiter may only be given a pod
-- of its own registration's view (its agent's pods of its pool), less the pods it tried. A
-- waiter none of whose pods is free is passed over, not a barrier: a younger one that can use
-- the free pod gets it. Stops as soon as no view has a free pod. Each grant is published to its
-- agent, except `quiet` (the caller, who reads it from the reply). Nothing is granted during a
-- recovery hold.
local function pump(quiet)
  if hold_left() > 0 then return end
  local views, counts, none = {}, {}, {}
  local flat = redis.call('HGETALL', P .. 'views')
  for i = 1, #flat, 2 do views[flat[i]] = parse_view(flat[i + 1]) end
  local open, n_open
  local function refresh()
    open, n_open = {}, 0
    for r, v in pairs(views) do
      if pick(v, none, counts) then open[r], n_open = true, n_open + 1 end
    end
  end
  refresh()
  local pos = 0 -- waiters passed over so far (granted ones leave the ZSET)
  while n_open > 0 do
    local ids = redis.call('ZRANGE', P .. 'queue', pos, pos + 63)
    if #ids == 0 then return end
    for _, id in ipairs(ids) do
      local a = owner(id)
      local pool = redis.call('HGET', P .. 'pool', id)
      local r = pool and reg_of(a, pool)
      local addr = r and open[r]
        and pick(views[r], parse_set(redis.call('HGET', P .. 'tried', id)), counts)
      if addr then
        unqueue(id, pool)
        take(id, addr, pool, counts)
        if id ~= quiet then redis.call('PUBLISH', 'lb:grant:' .. a, id .. ' ' .. addr) end
        refresh()
        if n_open == 0 then return end
      else
        pos = pos + 1
      end
    end
  end
end

-- Renews registration `reg` (ARGV order is the caller's). Returns false when the agent
-- believed it was registered (`known`) and is not: it was reaped while alive and must
-- re-assert.
local function renew(reg, ttl_ms, known)
  if known == '1' and not redis.call('ZSCORE', P .. 'agents', reg) then return false end
  redis.call('ZADD', P .. 'agents', int(now_ms + ttl_ms), reg)
  redis.call('HSET', P .. 'ttls', reg, int(ttl_ms))
  return true
end

local function epoch_is(e) return redis.call('HGET', P .. 'meta', 'epoch') == e end

-- The pool's figures: {waiting, expired, {addr, n, ...}} where the pods are those of any
-- agent's view of the pool, with their global counts (all pools), pods with none left out.
local function pool_status(pool)
  local seen, counts = {}, {}
  local flat = redis.call('HGETALL', P .. 'views')
  for i = 1, #flat, 2 do
    if reg_pool(flat[i]) == pool then
      for _, p in ipairs(parse_view(flat[i + 1])) do
        local a = p[1]
        if not seen[a] then
          seen[a] = true
          local n = redis.call('HGET', P .. 'inflight', a)
          if n then counts[#counts + 1] = a; counts[#counts + 1] = n end
        end
      end
    end
  end
  return {pool_waiting(pool), tonumber(redis.call('HGET', P .. 'expired', pool) or '0'), counts}
end
