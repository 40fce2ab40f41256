-- KEYS: 1 lease index (the index of RUNNING), 2 ready, 3 delayed, 4 inflight, 5 seq,
--       6 bodies (2-6: the queue's keys)
-- ARGV: 1 wake channel, 2 events channel, 3 task key prefix (keys.rs: QueueKeys::task_prefix),
--       4 status index prefix, 5 dependents key prefix, then one record after the other, each
--       12 + 2n + m values: task id, expected status, expected attempt, new status score (µs),
--       lease score ('' unless the new status is RUNNING), new status, new attempt, the
--       delivery's receipt, '-1' to ack else the nack delay (ms), the event, n, m, then n
--       field/value pairs to set and m names of fields to delete
-- task_queue::Composed::record for a batch of outcomes of one queue (the worker's records,
-- gathered while the previous batch was on its way), each as if alone: compare-and-set on
-- (status, attempt) as task_transition.lua, then the message is acked or given back (nack.lua)
-- and the event published. When the task already has the new status and attempt (this
-- record's own earlier write, whose reply was lost), only the message is settled. On any other
-- mismatch the message is acked and nothing else changes. A batch never holds two records of
-- one task (the caller keeps them apart), so the index moves and the acks of the batch are made
-- once for all of them, after the loop. The task hashes and dependents sets are not in KEYS;
-- on a cluster they carry the queue's hash tag, so they are in KEYS[1]'s slot (docs/backends/redis.md).
-- Returns one reply per record: {'ok', dependents...} (dependents only for a terminal status),
-- {'ok_unread', message} (recorded and settled, but the dependents set holds no sorted set),
-- {'missing'}, {'conflict', status, attempt}, or {'error', message} (the task key holds no hash;
-- nothing was changed for that record).
local leases = KEYS[1]
local tp, sp, dp = ARGV[3], ARGV[4], ARGV[5]

local function index(status)
  if status == 'RUNNING' then
    return leases
  end
  return sp .. status
end

-- index key -> ids leaving it; index key -> (score, id) pairs entering it
local leaving, entering = {}, {}

-- The index moves of the record at ARGV[i] (made once for the batch, after the loop).
local function move(i, id)
  local from, to = index(ARGV[i + 1]), index(ARGV[i + 5])
  if from ~= to then
    push(leaving, from, id)
  end
  if ARGV[i + 4] ~= '' then
    push(entering, leases, ARGV[i + 4], id)
  else
    push(entering, to, ARGV[i + 3], id)
  end
end

-- Whether the task, already at this record's new status and attempt, holds this record's own
-- updated_at: its earlier write, not another writer's (the monitor hands an expired lease back
-- with the same status and attempt as a worker's retry).
local function own_write(key, first, n)
  for j = first, first + 2 * n - 2, 2 do
    if ARGV[j] == 'updated_at' then
      return redis.call('HGET', key, 'updated_at') == ARGV[j + 1]
    end
  end
  return true
end

local acks = {}
-- Events are published only when someone listens (asked once, at the first event).
local events = nil
-- {reply, dependents key} of each record that reached a terminal status
local terminal = {}
local out = {}
local i = 6
while i <= #ARGV do
  local id = ARGV[i]
  local n, m = tonumber(ARGV[i + 10]), tonumber(ARGV[i + 11])
  local first = i + 12
  local after = first + 2 * n + m
  local key = tp .. id
  -- pcall: a key that is not a hash (written by hand) fails this record alone. A script that
  -- raises an error keeps what it wrote before, so the batch's other records must not stop
  -- half-done (their index moves and acks come after the loop).
  local cur = redis.pcall('HMGET', key, 'status', 'attempt')
  local status, attempt, r
  if cur.err then
    r = {'error', cur.err}
  else
    status, attempt = status_of(cur)
  end
  if r then
    -- (nothing changed: the caller gets the error)
  elseif not status then
    r = {'missing'}
  elseif status ~= ARGV[i + 1] or not same_attempt(attempt, ARGV[i + 2]) then
    if status ~= ARGV[i + 5] or not same_attempt(attempt, ARGV[i + 6])
      or not own_write(key, first, n) then
      acks[#acks + 1] = ARGV[i + 7]
      r = {'conflict', status, attempt}
    else
      -- This record's own earlier write (its reply was lost): the index moves again (both
      -- are idempotent), in case the earlier script stopped before making them.
      move(i, id)
    end
  else
    move(i, id)
    if n > 0 then
      redis.call('HSET', key, unpack(ARGV, first, first + 2 * n - 1))
    end
    if m > 0 then
      redis.call('HDEL', key, unpack(ARGV, first + 2 * n, after - 1))
    end
    if events == nil then
      events = listened(ARGV[2])
    end
    if events then
      publish_advisory(ARGV[2], ARGV[i + 9])
    end
  end
  if not r then
    local delay = tonumber(ARGV[i + 8])
    if delay < 0 then
      acks[#acks + 1] = ARGV[i + 7]
    else
      give_back(KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[i + 7], delay, ARGV[1])
    end
    r = {'ok'}
    local s = ARGV[i + 5]
    if s == 'COMPLETED' or s == 'FAILED' or s == 'CANCELLED' then
      terminal[#terminal + 1] = {r, dp .. id}
    end
  end
  out[#out + 1] = r
  i = after
end

-- After the loop nothing may stop the batch half-way (a script that raises an error keeps what it
-- wrote before): an index key of another type (written by hand) is logged and passed over, and
-- the acks still happen.
for key, ids in pairs(leaving) do
  call_chunked_or_log('ZREM', key, ids)
end
for key, pairs_ in pairs(entering) do
  call_chunked_or_log('ZADD', key, pairs_)
end

-- The acks, as remove_message for each (one ZREM per receipt: its reply says whether that
-- delivery was live, so a stale receipt never deletes the body of a newer delivery), and one
-- HDEL for the bodies.
if #acks > 0 then
  local ids = {}
  for j = 1, #acks do
    if take_live(KEYS[2], KEYS[4], acks[j]) then
      ids[#ids + 1] = string.match(acks[j], '^(%d+):')
    end
  end
  if #ids > 0 then
    redis.call('HDEL', KEYS[6], unpack(ids))
  end
end

if #terminal > 0 then
  local keys = {}
  for j = 1, #terminal do
    keys[j] = terminal[j][2]
  end
  if redis.call('EXISTS', unpack(keys)) > 0 then
    for j = 1, #terminal do
      local deps = redis.pcall('ZRANGE', keys[j], 0, -1)
      local r = terminal[j][1]
      if deps.err then
        -- The outcome is stored and settled, but its dependents could not be read: the caller
        -- logs it, and the monitor's sweep of WAITING tasks moves them on.
        r[1] = 'ok_unread'
        r[2] = deps.err
      else
        for k = 1, #deps do
          r[#r + 1] = deps[k]
        end
      end
    end
  end
end
return out
