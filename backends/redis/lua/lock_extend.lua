-- KEYS: 1 lock
-- ARGV: 1 token, 2 ttl_ms
-- Extends the lock if its value starts with this token. Returns 1, or 0 when not the owner.
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
