-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 dead
-- ARGV: 1 message key prefix, 2 max, 3 lease_ms, 4 max deliveries, 5 dead-letter reason,
--       6 dead-letter cap, 7 wake channel
-- Promotes due delayed messages and expired leases, then pops up to `max` most urgent ready
-- messages: each is dead-lettered if it already had `max deliveries`, else its delivery count
-- grows by one, its receipt (l = the delivery number) is set and it is leased until now+lease.
-- Returns {now_ms, lease_until_ms, wait_ms, id, body, priority, delivery, id, ...} where
-- wait_ms (only when nothing was delivered) is how long until a delayed message is due or a
-- lease ends (-1: never).
local mp = ARGV[1]
local now = now_ms()
local moved = promote(KEYS[1], KEYS[2], KEYS[3], KEYS[4], mp, now)
local max = tonumber(ARGV[2])
local lease_until = now + tonumber(ARGV[3])
local maxd = tonumber(ARGV[4])
local cap = tonumber(ARGV[6])
local out = {num(now), num(lease_until), '-1'}
local n = 0
while n < max do
  local popped = redis.call('ZPOPMIN', KEYS[1], max - n)
  if #popped == 0 then
    break
  end
  for i = 1, #popped, 2 do
    local id = popped[i]
    local key = mp .. id
    local v = redis.call('HMGET', key, 'body', 'p', 'd')
    if v[1] then
      local d = tonumber(v[3]) or 0
      if d >= maxd then
        bury(KEYS[5], key, id, ARGV[5], now, cap, mp)
      else
        d = d + 1
        redis.call('HSET', key, 'd', num(d), 'l', num(d))
        redis.call('ZADD', KEYS[3], num(lease_until), id)
        out[#out + 1] = id
        out[#out + 1] = v[1]
        out[#out + 1] = v[2]
        out[#out + 1] = num(d)
        n = n + 1
      end
    end
  end
end
if n == 0 then
  local next_at = -1
  local nd = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #nd > 0 then
    next_at = tonumber(nd[2])
  end
  local ni = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if #ni > 0 and (next_at < 0 or tonumber(ni[2]) < next_at) then
    next_at = tonumber(ni[2])
  end
  if next_at >= 0 then
    out[3] = num(math.max(0, next_at - now))
  end
elseif moved > 0 and redis.call('ZCARD', KEYS[1]) > 0 then
  -- Promoted messages this fetch could not take: wake the other consumers.
  redis.call('PUBLISH', ARGV[7], '')
end
return out
