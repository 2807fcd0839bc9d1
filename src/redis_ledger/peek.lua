-- ARGV: pool. Read only: {epoch or '', waiting, expired, {addr, n, ...}} of the pool, for
-- status and tests (see pool_status).
local s = pool_status(POOL)
return {redis.call('HGET', P .. 'meta', 'epoch') or '', s[1], s[2], s[3]}
