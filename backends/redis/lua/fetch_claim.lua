-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 dead, 6 bodies (the queue's keys)
-- ARGV: 1 max, 2 lease_ms, 3 max deliveries, 4 dead-letter reason, 5 dead-letter cap, 6 wake
--       channel (as fetch.lua), then the claim: 7 task key prefix (keys.rs: QueueKeys::task_prefix),
--       8 status index prefix, 9 lease index, 10 now (µs), 11 lease end (µs), 12 worker id,
--       13 now (ISO-8601), 14 lease end (ISO-8601), 15 events channel, 16 and 17 the event's
--       text around the attempt number (16 starts right after the task id)
-- A fetch (lease_batch), then the claim of each delivered message's task, as
-- task_queue::Composed::claim does it: PENDING, or RUNNING under an expired lease with
-- attempts left, becomes RUNNING with attempt + 1 for this worker (indexes moved, the event
-- published). The task hashes and indexes are not in KEYS (they are named by the messages);
-- on a cluster they carry the queue's hash tag, so they are in KEYS[1]'s slot (docs/backends/redis.md).
-- Returns {fetch reply, claims} where claims[i] is, for the i-th delivered message,
-- {field, value, ..., 'claimed'} (the task as it was before the claim), {field, value, ...,
-- 'unclaimable'}, {task id, 'missing'}, {task id, error, 'unreadable'} (the task key holds no
-- hash), {task id, why, 'corrupt'} (a hash codec::decode would refuse: task_check.lua) or
-- {'noncanonical'}: the tag comes last (appending is cheaper than inserting in front).
-- A message is read here only in the canonical forms TaskMessage::encode and the lab write
-- (`{"task_id":"<id>"}`, JSON whitespace allowed around the tokens), which serde_json reads
-- the same way; any other text is 'noncanonical' and left untouched to TaskMessage::decode
-- (the one JSON parser), so the two never disagree on which task a message names.
local out = lease_batch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[1]),
  tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6])
local tp, sp, leases = ARGV[7], ARGV[8], ARGV[9]
local now_us = tonumber(ARGV[10])
-- Index changes, made once for the whole batch: ids leaving each status index, and the
-- (score, id) pairs entering the lease index (the index of RUNNING).
local leaving = {}
local leased = {}
-- Tasks claimed by this call (a task named by two messages of the batch is claimed once).
local mine = {}

-- Events are published only when someone listens (asked once, at the first event).
local events = nil

-- `{"task_id": "<id>"}` with JSON whitespace (space, \t, \n, \r) around its tokens.
local JW = '[ \t\n\r]*'
local CANONICAL_SPACED = '^' .. JW .. '{' .. JW .. '"task_id"' .. JW .. ':' .. JW
  .. '"([%w_.:%-]+)"' .. JW .. '}' .. JW .. '$'

local function claim(body)
  -- The body the submit script writes (and the lab's, with spaces), read without a JSON parser.
  local id = string.match(body, '^{"task_id":"([%w_.:%-]+)"}$')
    or string.match(body, CANONICAL_SPACED)
  -- The model's rule for a task id (TaskId::parse).
  if not id or not valid_matched_id(id) then
    return {'noncanonical'}
  end
  local key = tp .. id
  -- pcall: a task key that holds no hash (written by hand) makes this claim unreadable, not
  -- the whole script fail after its fetch already leased the batch.
  local all = redis.pcall('HGETALL', key)
  if all.err then
    return {id, all.err, 'unreadable'}
  end
  if #all == 0 then
    return {id, 'missing'}
  end
  -- The fields the claim and its checks look at (a scan: cheaper than a table of every field).
  local task_id, status, attempt, handed_back, max_attempts, priority, payload, created_at
  local finished = false
  for i = 1, #all, 2 do
    local f = all[i]
    if f == 'status' then
      status = all[i + 1]
    elseif f == 'attempt' then
      attempt = all[i + 1]
    elseif f == 'payload' then
      payload = true
    elseif f == 'created_at' then
      created_at = true
    elseif f == 'priority' then
      priority = all[i + 1]
    elseif f == 'task_id' then
      task_id = all[i + 1]
    elseif f == 'max_attempts' then
      max_attempts = all[i + 1]
    elseif f == 'handed_back' then
      handed_back = all[i + 1]
    elseif f == 'result' or f == 'result_json' or f == 'finished_at' then
      finished = true
    end
  end
  -- A hash Rust cannot read is not touched: its message is dead-lettered with the reason.
  local why
  why, status = task_unreadable(id, task_id, status, payload, created_at, priority, attempt,
    handed_back, max_attempts)
  if why then
    return {id, why, 'corrupt'}
  end
  attempt = checked_int(attempt or '0', 0, 4294967295)
  local can = status == 'PENDING'
  if status == 'RUNNING' then
    local lease = redis.call('ZSCORE', leases, id)
    -- Attempts handed back by a worker shutting down are not charged (Task::attempts_left).
    local charged = attempt - checked_int(handed_back or '0', 0, 4294967295)
    can = not mine[id] and (not lease or tonumber(lease) <= now_us)
      and charged < checked_int(max_attempts or '1', 0, 4294967295)
  end
  if not can then
    all[#all + 1] = 'unclaimable'
    return all
  end
  mine[id] = true
  -- Saturating, as ClaimSpec::claimed_state: the attempt stays a u32.
  local a = num(math.min(attempt + 1, 4294967295))
  if status ~= 'RUNNING' then
    push(leaving, status, id)
  end
  redis.call('HSET', key, 'status', 'RUNNING', 'attempt', a, 'worker_id', ARGV[12],
    'lease_until', ARGV[14], 'heartbeat_at', ARGV[13], 'started_at', ARGV[13],
    'updated_at', ARGV[13])
  if finished then
    redis.call('HDEL', key, 'result', 'result_json', 'finished_at')
  end
  leased[#leased + 1] = ARGV[11]
  leased[#leased + 1] = id
  if events == nil then
    events = listened(ARGV[15])
  end
  if events then
    publish_advisory(ARGV[15], '{"task_id":"' .. id .. ARGV[16] .. a .. ARGV[17])
  end
  -- The task as it was: the caller applies the claim it asked for (ClaimSpec::claimed_state).
  all[#all + 1] = 'claimed'
  return all
end

local claims = {}
for i = 4, #out, 2 do
  claims[#claims + 1] = claim(out[i + 1])
end
-- The batch is leased and its tasks claimed: an index key of another type (written by hand) must
-- not stop the script now (its writes are kept), so it is logged and passed over.
for status, ids in pairs(leaving) do
  call_chunked_or_log('ZREM', sp .. status, ids)
end
call_chunked_or_log('ZADD', leases, leased)
return {out, claims}
