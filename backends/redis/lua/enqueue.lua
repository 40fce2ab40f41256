-- KEYS: 1 ready, 2 delayed, 3 seq, 4 bodies
-- ARGV: 1 wake channel, then per message: delay_ms, priority, body
-- Returns the new message ids. Publishes on the wake channel when the ready set goes from
-- empty to non-empty, or when a delayed message becomes the earliest one.
local was_empty = redis.call('ZCARD', KEYS[1]) == 0
local wake = false
local now = nil
local first_due = nil
local ids = {}
local bodies = {}
local ready = {}
local delayed = {}
local count = (#ARGV - 1) / 3
local id = redis.call('INCRBY', KEYS[3], count) - count
for i = 2, #ARGV, 3 do
  local delay = tonumber(ARGV[i])
  local p = ARGV[i + 1]
  id = id + 1
  local sid = num(id)
  bodies[#bodies + 1] = sid
  bodies[#bodies + 1] = ARGV[i + 2]
  if delay <= 0 then
    ready[#ready + 1] = ready_score(p, id)
    ready[#ready + 1] = header(sid, '0', p, sid)
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
    delayed[#delayed + 1] = due
    delayed[#delayed + 1] = header(sid, '0', p, sid)
    if not first_due or due < first_due then
      wake = true
      first_due = due
    end
  end
  ids[#ids + 1] = sid
end
call_chunked('HSET', KEYS[4], bodies)
if #ready > 0 then
  call_chunked('ZADD', KEYS[1], ready)
end
if #delayed > 0 then
  call_chunked('ZADD', KEYS[2], delayed)
end
if wake then
  publish_advisory(ARGV[1], '')
end
return ids
