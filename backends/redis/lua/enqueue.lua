-- KEYS: 1 ready, 2 delayed, 3 seq
-- ARGV: 1 message key prefix, 2 wake channel, then per message: delay_ms, priority, body
-- Returns the new message ids. Publishes on the wake channel when the ready set goes from
-- empty to non-empty, or when a delayed message becomes the earliest one.
local mp = ARGV[1]
local was_empty = redis.call('ZCARD', KEYS[1]) == 0
local wake = false
local now = nil
local first_due = nil
local ids = {}
local count = (#ARGV - 2) / 3
local id = redis.call('INCRBY', KEYS[3], count) - count
for i = 3, #ARGV, 3 do
  local delay = tonumber(ARGV[i])
  local p = tonumber(ARGV[i + 1])
  id = id + 1
  local key = mp .. id
  if delay <= 0 then
    add_ready(KEYS[1], key, id, ARGV[i + 1], ARGV[i + 2])
    if was_empty then
      wake = true
    end
  else
    if not now then
      now = now_ms()
      local f = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
      if #f > 0 then
        first_due = tonumber(f[2])
      end
    end
    local due = now + delay
    redis.call('HSET', key, 'body', ARGV[i + 2], 'p', ARGV[i + 1], 'd', '0', 'l', '0')
    redis.call('ZADD', KEYS[2], num(due), id)
    if not first_due or due < first_due then
      wake = true
      first_due = due
    end
  end
  ids[#ids + 1] = id
end
if wake then
  redis.call('PUBLISH', ARGV[2], '')
end
return ids
