-- KEYS: 1 task hash, 2 lease index, 3 index of the expected status, 4 index of the new status,
--       5 the task's dependents set, 6 ready, 7 delayed, 8 inflight, 9 seq (6-9: the queue's
--       keys), 10 the queue's bodies
-- ARGV: 1 task id, 2 expected status, 3 expected attempt, 4 new status score (µs), 5 lease
--       score ('' unless RUNNING), 6 new status, 7 new attempt, 8 the delivery's receipt,
--       9 '-1' to ack, else the nack delay (ms), 10 wake channel, 11 events channel, 12 the
--       event, 13 number of fields to set (n), 14 .. 13+2n field, value pairs, then the names
--       of the fields to delete
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
if status ~= ARGV[2] or not same_attempt(attempt, ARGV[3]) then
  if status ~= ARGV[6] or not same_attempt(attempt, ARGV[7]) then
    remove_message(KEYS[6], KEYS[8], KEYS[10], ARGV[8])
    return {'conflict', status, attempt}
  end
else
  apply_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], id, ARGV[4], ARGV[5], ARGV, 14,
    tonumber(ARGV[13]))
  redis.call('PUBLISH', ARGV[11], ARGV[12])
end
local delay = tonumber(ARGV[9])
if delay < 0 then
  remove_message(KEYS[6], KEYS[8], KEYS[10], ARGV[8])
else
  give_back(KEYS[6], KEYS[7], KEYS[8], KEYS[9], ARGV[8], delay, ARGV[10])
end
local s = ARGV[6]
if s == 'COMPLETED' or s == 'FAILED' or s == 'CANCELLED' then
  local deps = redis.call('ZRANGE', KEYS[5], 0, -1)
  table.insert(deps, 1, 'ok')
  return deps
end
return {'ok'}
