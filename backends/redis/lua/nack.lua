-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 message key
-- ARGV: 1 message id, 2 delivery number of the receipt, 3 delay_ms, 4 wake channel
-- Gives a live delivery back: ready again at the end of its priority (delay 0), or delayed.
-- Returns 1 if given back, 0 if the receipt was stale.
if redis.call('HGET', KEYS[5], 'l') ~= ARGV[2] then
  return 0
end
local id = ARGV[1]
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[1], id)
local p = tonumber(redis.call('HGET', KEYS[5], 'p'))
redis.call('HSET', KEYS[5], 'l', '0')
local delay = tonumber(ARGV[3])
if delay <= 0 then
  local was_empty = redis.call('ZCARD', KEYS[1]) == 0
  local s = redis.call('INCR', KEYS[4])
  redis.call('HSET', KEYS[5], 's', num(s))
  redis.call('ZADD', KEYS[1], ready_score(p, s), id)
  if was_empty then
    redis.call('PUBLISH', ARGV[4], '')
  end
else
  local due = now_ms() + delay
  local f = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  redis.call('ZADD', KEYS[2], num(due), id)
  if #f == 0 or due < tonumber(f[2]) then
    redis.call('PUBLISH', ARGV[4], '')
  end
end
return 1
