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
