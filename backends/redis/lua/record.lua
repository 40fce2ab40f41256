-- KEYS: 1 task hash, 2 lease index, 3 index of the expected status, 4 index of the new status,
--       5 the task's dependents set, 6 ready, 7 delayed, 8 inflight, 9 seq, 10 message key
--       (6-10: the queue's keys)
-- ARGV: 1 task id, 2 expected status, 3 expected attempt, 4 new status score (µs), 5 lease
--       score ('' unless RUNNING), 6 new status, 7 new attempt, 8 message id, 9 delivery number
--       of the receipt, 10 '-1' to ack, else the nack delay (ms), 11 wake channel, 12 events
--       channel, 13 the event, 14 number of fields to set (n), 15 .. 14+2n field, value pairs,
--       then the names of the fields to delete
-- task_queue::Composed::record in one step: compare-and-set on (status, attempt) as
-- task_transition.lua, then the message is acked or given back (nack.lua) and the event
-- published. When the task already has the new status and attempt (this call's own earlier
-- write, whose reply was lost), only the message is settled. On any other mismatch the message
-- is acked and nothing else changes.
-- Returns {'ok', dependents...} (dependents only for a terminal status), {'missing'}, or
-- {'conflict', status, attempt}.
local status, attempt = task_status(KEYS[1])
if not status then
  return {'missing'}
end
local id = ARGV[1]
if status ~= ARGV[2] or attempt ~= tonumber(ARGV[3]) then
  if status ~= ARGV[6] or attempt ~= tonumber(ARGV[7]) then
    remove_message(KEYS[6], KEYS[8], KEYS[10], ARGV[8], ARGV[9])
    return {'conflict', status, tostring(attempt)}
  end
else
  apply_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, status, ARGV[4], ARGV[5], ARGV, 15,
    tonumber(ARGV[14]))
  redis.call('PUBLISH', ARGV[12], ARGV[13])
end
local delay = tonumber(ARGV[10])
if delay < 0 then
  remove_message(KEYS[6], KEYS[8], KEYS[10], ARGV[8], ARGV[9])
else
  give_back(KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], ARGV[8], ARGV[9], delay, ARGV[11])
end
local s = ARGV[6]
if s == 'COMPLETED' or s == 'FAILED' or s == 'CANCELLED' then
  local deps = redis.call('ZRANGE', KEYS[5], 0, -1)
  table.insert(deps, 1, 'ok')
  return deps
end
return {'ok'}
