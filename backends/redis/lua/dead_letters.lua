-- KEYS: 1 dead
-- ARGV: 1 message key prefix, 2 limit
-- Read-only. Returns {id, body, priority, deliveries, reason, dead_at_ms, ...}, newest first.
-- The message hashes are not declared in KEYS (their ids are read here) but share the queue's
-- hash tag, so they live in the same slot.
local ids = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1)
local out = {}
for i = 1, #ids do
  local v = redis.call('HMGET', ARGV[1] .. ids[i], 'body', 'p', 'd', 'reason', 'dead_at')
  if v[1] then
    out[#out + 1] = ids[i]
    out[#out + 1] = v[1]
    out[#out + 1] = v[2] or '5'
    out[#out + 1] = v[3] or '0'
    out[#out + 1] = v[4] or ''
    out[#out + 1] = v[5] or '0'
  end
end
return out
