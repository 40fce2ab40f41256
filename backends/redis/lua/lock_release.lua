-- KEYS: 1 lock
-- ARGV: 1 token
-- Deletes the lock if its value starts with this token. Returns 1, or 0 when not the owner.
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
