-- ARGV: pool, id. A lease released or a waiter gone (timeout, client gone): its slot goes to
-- the oldest waiter (of any pool) that can use it. Returns 'lease', 'waiter' or '' (unknown:
-- already gone).
local was = drop(ARGV[2])
local freed = reap()
if was == 'lease' or freed > 0 then pump(nil) end
return was or ''
