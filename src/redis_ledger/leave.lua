-- ARGV: id. A lease released or a waiter gone (timeout, client gone): its slot goes to the
-- oldest waiter that can use it. Returns 'lease', 'waiter' or '' (unknown: already gone).
local was = drop(ARGV[1])
local freed = reap()
if was == 'lease' or freed > 0 then pump(nil) end
return was or ''
