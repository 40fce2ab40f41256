-- KEYS: 1 dead, 2 bodies
-- ARGV: 1 limit
-- Read-only. Returns {id, body, priority, deliveries, reason, dead_at_ms, ...}, newest first.
local entries = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
local parsed = {}
local ids = {}
for i = 1, #entries do
  local id, d, p, at, reason = string.match(entries[i], '^(%d+):(%d+):(%d+):(%d+):(.*)$')
  if id then
    ids[#ids + 1] = id
    parsed[#parsed + 1] = {id, d, p, at, reason}
  end
end
if #ids == 0 then
  return out
end
local found = redis.call('HMGET', KEYS[2], unpack(ids))
for i = 1, #parsed do
  local e = parsed[i]
  if found[i] then
    out[#out + 1] = e[1]
    out[#out + 1] = found[i]
    out[#out + 1] = e[3]
    out[#out + 1] = e[2]
    out[#out + 1] = e[5]
    out[#out + 1] = e[4]
  end
end
return out
