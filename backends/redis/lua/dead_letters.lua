-- KEYS: 1 dead, 2 bodies
-- ARGV: 1 limit
-- Read-only. Returns {id, body, priority, deliveries, reason, dead_at_ms, ...}, newest first.
-- A dead letter written before 2026-11-25 is a bare id whose HASH '<queue>:m:<id>' holds the
-- rest (same hash tag, so same slot).
local entries = redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[1]) - 1)
local rows = {}
local ids = {}
for i = 1, #entries do
  local id, d, p, at, reason = string.match(entries[i], '^(%d+):(%d+):(%d+):(%d+):(.*)$')
  if id then
    ids[#ids + 1] = id
    rows[#rows + 1] = {id, d, p, at, reason, #ids}
  elseif string.match(entries[i], '^%d+$') then
    local v = redis.call('HMGET', legacy_key(KEYS[2], entries[i]), 'body', 'p', 'd', 'reason',
      'dead_at')
    if v[1] then
      rows[#rows + 1] = {entries[i], v[3] or '0', v[2] or '5', v[5] or '0', v[4] or '', v[1]}
    end
  end
end
-- The bodies, in chunks (unpack has a limit).
local found = {}
local i = 1
while i <= #ids do
  local j = math.min(#ids, i + 999)
  local got = redis.call('HMGET', KEYS[2], unpack(ids, i, j))
  for k = 1, #got do
    found[i + k - 1] = got[k]
  end
  i = j + 1
end
local out = {}
for r = 1, #rows do
  local e = rows[r]
  local body = e[6]
  if type(body) == 'number' then
    body = found[body]
  end
  if body then
    out[#out + 1] = e[1]
    out[#out + 1] = body
    out[#out + 1] = e[3]
    out[#out + 1] = e[2]
    out[#out + 1] = e[5]
    out[#out + 1] = e[4]
  end
end
return out
