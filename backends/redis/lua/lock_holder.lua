-- KEYS: 1 lock
-- Returns {value, pttl_ms} or nil when nobody holds it.
local v = redis.call('GET', KEYS[1])
if not v then
  return false
end
return {v, redis.call('PTTL', KEYS[1])}
