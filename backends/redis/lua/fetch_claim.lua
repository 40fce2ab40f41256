-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 dead (the queue's keys)
-- ARGV: 1 message key prefix, 2 max, 3 lease_ms, 4 max deliveries, 5 dead-letter reason,
--       6 dead-letter cap, 7 wake channel (as fetch.lua), then the claim:
--       8 task key prefix ('<prefix>task_registry:'), 9 status index prefix, 10 lease index,
--       11 now (µs), 12 lease end (µs), 13 worker id, 14 now (ISO-8601), 15 lease end
--       (ISO-8601), 16 events channel, 17 and 18 the event's text around the attempt number
--       (17 starts right after the task id)
-- A fetch (lease_batch), then the claim of each delivered message's task, as
-- task_queue::Composed::claim does it: PENDING, or RUNNING under an expired lease with
-- attempts left, becomes RUNNING with attempt + 1 for this worker (indexes moved, the event
-- published). The task hashes and indexes are not in KEYS (they are named by the messages):
-- see docs/backends/redis.md about Redis Cluster.
-- Returns {fetch reply, claims} where claims[i] is, for the i-th delivered message,
-- {'claimed', field, value, ...} (the task as it was before the claim), {'unclaimable', field,
-- value, ...}, {'missing', task id} or {'malformed'}.
local out = lease_batch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), ARGV[7])
local tp, sp, leases = ARGV[8], ARGV[9], ARGV[10]
local now_us = tonumber(ARGV[11])

local function claim(body)
  local ok, m = pcall(cjson.decode, body)
  if not ok or type(m) ~= 'table' or type(m.task_id) ~= 'string' then
    return {'malformed'}
  end
  local id = m.task_id
  -- The model's rule for a task id (TaskId::parse).
  if #id > 128 or not string.match(id, '^[%w_.:%-]+$') then
    return {'malformed'}
  end
  local key = tp .. id
  local all = redis.call('HGETALL', key)
  if #all == 0 then
    return {'missing', id}
  end
  local f = {}
  for i = 1, #all, 2 do
    f[all[i]] = all[i + 1]
  end
  local status = f.status or ''
  if string.byte(status, 1) == 84 then -- 'T': the lab's 'TaskStatus.PENDING'
    status = string.gsub(status, '^TaskStatus%.', '')
  end
  local attempt = tonumber(f.attempt or '0') or 0
  local can = status == 'PENDING'
  if status == 'RUNNING' then
    local lease = redis.call('ZSCORE', leases, id)
    can = (not lease or tonumber(lease) <= now_us) and attempt < (tonumber(f.max_attempts or '1') or 1)
  end
  if not can then
    table.insert(all, 1, 'unclaimable')
    return all
  end
  local a = tostring(attempt + 1)
  if status ~= 'RUNNING' then
    redis.call('ZREM', sp .. status, id)
  end
  redis.call('HSET', key, 'status', 'RUNNING', 'attempt', a, 'worker_id', ARGV[13],
    'lease_until', ARGV[15], 'heartbeat_at', ARGV[14], 'started_at', ARGV[14],
    'updated_at', ARGV[14])
  if f.result or f.result_json or f.finished_at then
    redis.call('HDEL', key, 'result', 'result_json', 'finished_at')
  end
  redis.call('ZADD', sp .. 'RUNNING', ARGV[11], id)
  redis.call('ZADD', leases, ARGV[12], id)
  redis.call('PUBLISH', ARGV[16], '{"task_id":"' .. id .. ARGV[17] .. a .. ARGV[18])
  -- The task as it was: the caller applies the claim it asked for (ClaimSpec::claimed_state).
  table.insert(all, 1, 'claimed')
  return all
end

local claims = {}
for i = 4, #out, 4 do
  claims[#claims + 1] = claim(out[i + 1])
end
return {out, claims}
