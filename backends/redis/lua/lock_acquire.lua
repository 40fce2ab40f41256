-- KEYS: 1 lock, 2 fencing counter (same hash tag)
-- ARGV: 1 token, 2 ttl_ms, 3 owner
-- Takes the lock if nobody holds it (an expired lock is gone: Redis expired the key). The
-- fencing counter only grows on a successful acquisition and never expires.
-- Returns the fencing token, or nil when the lock is held.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. string.format('%d', fence) .. '|' .. ARGV[3], 'PX', ARGV[2])
return fence
