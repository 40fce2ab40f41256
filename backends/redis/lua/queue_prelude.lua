-- Shared by every work-queue script (prepended at build time).
-- A queue's keys share the hash tag {prefix}q:{<queue>}, so each script touches one slot.
-- Ready score = priority * 2^49 + sequence: strict priority, FIFO inside a priority, exact in a
-- double for 11 * 2^49 < 2^53. Numbers passed to redis.call are formatted with %.0f because
-- Lua's default number-to-string conversion keeps only 14 significant digits.
local P = 562949953421312

local function num(x)
  return string.format('%.0f', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ready_score(p, s)
  return num(p * P + s)
end

-- Adds message `id` (its own sequence number) to the ready set, with its hash.
local function add_ready(ready, key, id, p, body)
  redis.call('HSET', key, 'body', body, 'p', p, 's', num(id), 'd', '0', 'l', '0')
  redis.call('ZADD', ready, ready_score(tonumber(p), id), id)
end

-- Moves due delayed messages (with a new sequence number: FIFO by the time they became ready)
-- and messages whose lease ended (with their old sequence number: back where they were) to the
-- ready set. Bounded per call so that one script never runs long.
local function promote(ready, delayed, inflight, seq, mp, now)
  local moved = 0
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', num(now), 'LIMIT', 0, 1000)
  for i = 1, #due do
    local id = due[i]
    local p = redis.call('HGET', mp .. id, 'p')
    if p then
      local s = redis.call('INCR', seq)
      redis.call('HSET', mp .. id, 's', num(s))
      redis.call('ZADD', ready, ready_score(tonumber(p), s), id)
      moved = moved + 1
    end
  end
  if #due > 0 then
    redis.call('ZREM', delayed, unpack(due))
  end
  local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', num(now), 'LIMIT', 0, 1000)
  for i = 1, #expired do
    local id = expired[i]
    local v = redis.call('HMGET', mp .. id, 'p', 's')
    if v[1] then
      redis.call('ZADD', ready, ready_score(tonumber(v[1]), tonumber(v[2])), id)
      moved = moved + 1
    end
  end
  if #expired > 0 then
    redis.call('ZREM', inflight, unpack(expired))
  end
  return moved
end

-- Moves a message to the dead letters: the hash stays (with the reason), its id goes on the
-- dead list; past `cap` entries the oldest dead letter is deleted for good.
local function bury(dead, key, id, reason, now, cap, mp)
  redis.call('HSET', key, 'reason', reason, 'dead_at', num(now), 'l', '0')
  redis.call('LPUSH', dead, id)
  if redis.call('LLEN', dead) > cap then
    local old = redis.call('RPOP', dead)
    if old then
      redis.call('DEL', mp .. old)
    end
  end
end

-- Pops up to `max` most urgent ready messages after promoting what is due: each is
-- dead-lettered if it already had `maxd` deliveries, else its delivery count grows by one, its
-- receipt (l = the delivery number) is set and it is leased until now + lease_ms.
-- Returns {now_ms, lease_until_ms, wait_ms, id, body, priority, delivery, id, ...} where
-- wait_ms (only when nothing was delivered) is how long until a delayed message is due or a
-- lease ends (-1: never).
local function lease_batch(ready, delayed, inflight, seq, dead, mp, max, lease_ms, maxd, reason, cap, wake)
  local now = now_ms()
  local moved = promote(ready, delayed, inflight, seq, mp, now)
  local lease_until = now + lease_ms
  local out = {num(now), num(lease_until), '-1'}
  local n = 0
  while n < max do
    local popped = redis.call('ZPOPMIN', ready, max - n)
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
          bury(dead, key, id, reason, now, cap, mp)
        else
          d = d + 1
          redis.call('HSET', key, 'd', num(d), 'l', num(d))
          redis.call('ZADD', inflight, num(lease_until), id)
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
    local nd = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
    if #nd > 0 then
      next_at = tonumber(nd[2])
    end
    local ni = redis.call('ZRANGE', inflight, 0, 0, 'WITHSCORES')
    if #ni > 0 and (next_at < 0 or tonumber(ni[2]) < next_at) then
      next_at = tonumber(ni[2])
    end
    if next_at >= 0 then
      out[3] = num(math.max(0, next_at - now))
    end
  elseif moved > 0 and redis.call('ZCARD', ready) > 0 then
    -- Promoted messages this fetch could not take: wake the other consumers.
    redis.call('PUBLISH', wake, '')
  end
  return out
end

-- Deletes a delivered message if its receipt `n` is still the live one (a newer delivery or a
-- nack makes an old receipt stale). Returns 1 if deleted, 0 otherwise.
local function remove_message(ready, inflight, key, id, n)
  if redis.call('HGET', key, 'l') ~= n then
    return 0
  end
  -- Usually leased; ready only if its lease ended and a fetch or stats promoted it.
  if redis.call('ZREM', inflight, id) == 0 then
    redis.call('ZREM', ready, id)
  end
  redis.call('DEL', key)
  return 1
end

-- Gives a live delivery back: ready again at the end of its priority (delay 0), or delayed.
-- Returns 1 if given back, 0 if the receipt was stale.
local function give_back(ready, delayed, inflight, seq, key, id, n, delay, wake)
  if redis.call('HGET', key, 'l') ~= n then
    return 0
  end
  redis.call('ZREM', inflight, id)
  redis.call('ZREM', ready, id)
  local p = tonumber(redis.call('HGET', key, 'p'))
  redis.call('HSET', key, 'l', '0')
  if delay <= 0 then
    local was_empty = redis.call('ZCARD', ready) == 0
    local s = redis.call('INCR', seq)
    redis.call('HSET', key, 's', num(s))
    redis.call('ZADD', ready, ready_score(p, s), id)
    if was_empty then
      redis.call('PUBLISH', wake, '')
    end
  else
    local due = now_ms() + delay
    local f = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
    redis.call('ZADD', delayed, num(due), id)
    if #f == 0 or due < tonumber(f[2]) then
      redis.call('PUBLISH', wake, '')
    end
  end
  return 1
end
