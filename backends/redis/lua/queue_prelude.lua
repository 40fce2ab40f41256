-- Shared by every work-queue script (prepended at build time).
-- A queue's keys share the hash tag {prefix}q:{<queue>}, so each script touches one slot.
-- A message is a header 'id:d:p:s' (its id, the deliveries so far, its priority, its sequence
-- number) kept in exactly one of three sorted sets: ready (score p * 2^49 + s: strict
-- priority, FIFO inside a priority, exact in a double for 11 * 2^49 < 2^53), delayed (score:
-- due time, ms) or in-flight (score: lease end, ms). Its body is the field `id` of the bodies
-- hash. A delivery's receipt is its header: every delivery has a new d and every give-back a
-- new s, so a receipt names one delivery and goes stale once it is settled or redelivered.
-- Integers that become strings are formatted with %d: Lua's default number-to-string
-- conversion keeps only 14 significant digits, and %d costs a third of %.0f. Scores go to
-- redis.call as such text too (exact, and cheaper than the %.17g Redis applies to a number).
local P = 562949953421312
-- P * priority, by the priority's text.
local PS = {['1'] = P, ['2'] = 2 * P, ['3'] = 3 * P, ['4'] = 4 * P, ['5'] = 5 * P,
  ['6'] = 6 * P, ['7'] = 7 * P, ['8'] = 8 * P, ['9'] = 9 * P, ['10'] = 10 * P}

local function num(x)
  return string.format('%d', x)
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The ready score of priority `p` (its text) and sequence number `s` (a number or its text),
-- as text: a number handed to redis.call is formatted by Redis with a %.17g printf, four times
-- the cost of %d.
local function ready_score(p, s)
  return num((PS[p] or tonumber(p) * P) + tonumber(s))
end

-- id, d, p, s of a header (strings), or nil for anything else.
local function parse(h)
  return string.match(h, '^(%d+):(%d+):(%d+):(%d+)$')
end

local function header(id, d, p, s)
  return id .. ':' .. d .. ':' .. p .. ':' .. s
end

-- Messages written before 2026-11-25 are a bare id in the sets and a HASH '<queue>:m:<id>'
-- (body, p, s, d): the first script that meets one moves it to the current layout and returns
-- its header, so that an upgrade with messages queued loses none (nil: no such message).
local function legacy_key(bodies, id)
  return string.sub(bodies, 1, -7) .. 'm:' .. id
end

local function legacy(bodies, id)
  if not string.match(id, '^%d+$') then
    return nil
  end
  local key = legacy_key(bodies, id)
  local v = redis.call('HMGET', key, 'body', 'p', 's', 'd')
  redis.call('DEL', key)
  if not v[1] then
    return nil
  end
  redis.call('HSET', bodies, id, v[1])
  return header(id, v[4] or '0', v[2] or '5', v[3] or id)
end

-- The header `m` (or the legacy message `m` moved to the current layout) and its parts.
local function parse_member(bodies, m)
  local id, d, p, s = parse(m)
  if id then
    return m, id, d, p, s
  end
  local h = legacy(bodies, m)
  if h then
    return h, parse(h)
  end
  return nil
end

-- Whether a PUBLISH on `channel` reaches anyone on this server: a subscriber of the channel or
-- of any pattern. Events are published only then (a message nobody receives costs Redis a
-- command per task state change for nothing); a client subscribed on a replica of this server
-- does not count (docs/backends/redis.md). Through pcall: a refused PUBSUB (an ACL user without
-- it) counts as someone listening, so a script never stops half-way over an advisory event.
-- A channel marked with a leading '!' (on a Redis Cluster, where PUBSUB NUMSUB counts only this
-- node's subscribers while PUBLISH reaches every node's) is always listened to.
local function listened(channel)
  if string.byte(channel, 1) == 33 then -- '!'
    return true
  end
  local pats = redis.pcall('PUBSUB', 'NUMPAT')
  if type(pats) ~= 'number' or pats > 0 then
    return true
  end
  local subs = redis.pcall('PUBSUB', 'NUMSUB', channel)
  return subs.err ~= nil or not subs[2] or subs[2] > 0
end

-- Publishes an advisory message: an event (at most once) or a queue's wake-up (a waiting fetch
-- also looks again every second). A refused PUBLISH (an ACL user without the channel) drops it
-- instead of stopping the script after its writes.
local function publish_advisory(channel, message)
  if string.byte(channel, 1) == 33 then -- '!': see listened
    channel = string.sub(channel, 2)
  end
  redis.pcall('PUBLISH', channel, message)
end

-- redis.call(cmd, key, args...) in chunks of 4,000 arguments (unpack has a limit). `guarded`:
-- through pcall, an error (a key of another type, written by hand) going to the server's log
-- instead of stopping a script whose earlier writes are kept.
local function call_chunked(cmd, key, args, guarded)
  local n = #args
  local i = 1
  while i <= n do
    local j = math.min(n, i + 3999)
    if guarded then
      local r = redis.pcall(cmd, key, unpack(args, i, j))
      if type(r) == 'table' and r.err then
        redis.log(redis.LOG_WARNING, 'agent-orchestra: ' .. cmd .. ' ' .. key .. ': ' .. r.err)
        return
      end
    else
      redis.call(cmd, key, unpack(args, i, j))
    end
    i = j + 1
  end
end

-- The per-batch index moves, after a script's first writes (call_chunked, guarded).
local function call_chunked_or_log(cmd, key, args)
  call_chunked(cmd, key, args, true)
end

-- Moves due delayed messages (with a new sequence number: FIFO by the time they became ready)
-- and messages whose lease ended (with their old sequence number: back where they were) to the
-- ready set. Bounded per call so that one script never runs long.
local function promote(ready, delayed, inflight, seq, bodies, now)
  local moved = 0
  local add = {}
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, 1000)
  if #due > 0 then
    local s = redis.call('INCRBY', seq, #due) - #due
    for i = 1, #due do
      local _, id, d, p = parse_member(bodies, due[i])
      if id then
        s = s + 1
        add[#add + 1] = ready_score(p, s)
        add[#add + 1] = header(id, d, p, num(s))
        moved = moved + 1
      end
    end
    redis.call('ZREM', delayed, unpack(due))
  end
  local expired = redis.call('ZRANGEBYSCORE', inflight, '-inf', now, 'LIMIT', 0, 1000)
  if #expired > 0 then
    for i = 1, #expired do
      local h, id, _, p, s = parse_member(bodies, expired[i])
      if id then
        add[#add + 1] = ready_score(p, s)
        add[#add + 1] = h
        moved = moved + 1
      end
    end
    redis.call('ZREM', inflight, unpack(expired))
  end
  if #add > 0 then
    call_chunked('ZADD', ready, add)
  end
  return moved
end

-- Moves the message of header `h` (already out of its set) to the dead letters: the entry
-- 'id:d:p:dead_at:reason' goes on the dead list, the body stays; past `cap` entries the oldest
-- dead letter is deleted for good, body included.
local function bury(dead, bodies, h, reason, now, cap)
  local id, d, p = parse(h)
  if not id then
    return
  end
  if redis.call('LPUSH', dead, header(id, d, p, num(now)) .. ':' .. reason) > cap then
    local old = redis.call('RPOP', dead)
    local oid = old and string.match(old, '^(%d+)')
    if oid then
      redis.call('HDEL', bodies, oid)
      if oid == old then -- a legacy dead letter: its hash
        redis.call('DEL', legacy_key(bodies, oid))
      end
    end
  end
end

-- Pops up to `max` most urgent ready messages after promoting what is due: each is
-- dead-lettered if it already had `maxd` deliveries, else it is leased until now + lease_ms
-- under a new header (its delivery count grown by one).
-- Returns {now_ms, lease_until_ms, wait_ms, header, body, header, body, ...} where wait_ms
-- (only when nothing was delivered) is how long until a delayed message is due or a lease ends
-- (-1: never), and each header is the delivery's receipt.
local function lease_batch(ready, delayed, inflight, seq, dead, bodies, max, lease_ms, maxd, reason, cap, wake)
  local now = now_ms()
  local moved = promote(ready, delayed, inflight, seq, bodies, now)
  local lease_until = now + lease_ms
  local out = {num(now), num(lease_until), '-1'}
  local heads = {}
  local ids = {}
  while #ids < max do
    -- ZRANGE + ZREM rather than ZPOPMIN: the scores are not needed, and Redis formats each
    -- score it returns (a %.17g printf per message).
    local popped = redis.call('ZRANGE', ready, 0, max - #ids - 1)
    if #popped == 0 then
      break
    end
    redis.call('ZREM', ready, unpack(popped))
    for i = 1, #popped do
      local h, id, d, p, s = parse_member(bodies, popped[i])
      if id then
        d = tonumber(d)
        if d >= maxd then
          bury(dead, bodies, h, reason, now, cap)
        else
          ids[#ids + 1] = id
          heads[#heads + 1] = header(id, num(d + 1), p, s)
        end
      end
    end
  end
  if #ids > 0 then
    local found = redis.call('HMGET', bodies, unpack(ids))
    local leased = {}
    local lu = num(lease_until)
    for i = 1, #ids do
      -- A message without a body cannot be delivered (nothing writes one); it is dropped.
      if found[i] then
        leased[#leased + 1] = lu
        leased[#leased + 1] = heads[i]
        out[#out + 1] = heads[i]
        out[#out + 1] = found[i]
      end
    end
    if #leased > 0 then
      redis.call('ZADD', inflight, unpack(leased))
    end
  end
  -- out[3]: when nothing was delivered, ms until the next delayed or leased message is due
  -- (-1: none); when something was and the ready set is now empty (fewer than `max` taken),
  -- the same, an hour when none is due, so that the client waits for a wake-up before it asks
  -- again (bus.rs: fetch_waiting); -1 when the ready set may hold more.
  if #out == 3 or #ids < max then
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
    elseif #out > 3 then
      out[3] = '3600000'
    end
  elseif moved > 0 and redis.call('ZCARD', ready) > 0 then
    -- Promoted messages this fetch could not take: wake the other consumers.
    publish_advisory(wake, '')
  end
  return out
end

-- Takes the delivery of receipt `h` out of the in-flight set (or the ready set, where it is
-- when its lease ended and a fetch or stats promoted it but nobody took it yet). Returns false
-- when the receipt is stale: a newer delivery, or the message already settled or given back.
local function take_live(ready, inflight, h)
  return redis.call('ZREM', inflight, h) == 1 or redis.call('ZREM', ready, h) == 1
end

-- Deletes a delivered message if its receipt `h` is still the live one. Returns 1 if deleted,
-- 0 otherwise.
local function remove_message(ready, inflight, bodies, h)
  if not take_live(ready, inflight, h) then
    return 0
  end
  redis.call('HDEL', bodies, string.match(h, '^(%d+):'))
  return 1
end

-- Gives a live delivery back: ready again at the end of its priority (delay 0), or delayed.
-- Returns 1 if given back, 0 if the receipt was stale.
local function give_back(ready, delayed, inflight, seq, h, delay, wake)
  if not take_live(ready, inflight, h) then
    return 0
  end
  local id, d, p = parse(h)
  if delay <= 0 then
    local was_empty = redis.call('ZCARD', ready) == 0
    local s = redis.call('INCR', seq)
    redis.call('ZADD', ready, ready_score(p, s), header(id, d, p, num(s)))
    if was_empty then
      publish_advisory(wake, '')
    end
  else
    local due = now_ms() + delay
    local f = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
    redis.call('ZADD', delayed, due, h)
    if #f == 0 or due < tonumber(f[2]) then
      publish_advisory(wake, '')
    end
  end
  return 1
end
