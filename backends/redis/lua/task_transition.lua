-- KEYS: 1 task hash, 2 lease index, 3 index of the expected status, 4 index of the new status
-- ARGV: 1 task id, 2 expected status, 3 expected attempt, 4 new status score (µs),
--       5 lease score ('' unless the new status is RUNNING), 6 '1' to return every field
--       (the caller does not know the task's immutable part), 7 number of fields to set (n),
--       8 .. 7+2n field, value pairs, then the names of the fields to delete
-- Compare-and-set on (status, attempt); the status indexes and the lease index change in the
-- same step.
-- Returns {'all', field, value, ...} (the task after the change) when asked, else
-- {'ok', created_at, priority} (for the caller to check its copy of the immutable part);
-- {'missing'} or {'conflict', status, attempt} when nothing changed.
local status, attempt, cur = task_status(KEYS[1], 'created_at', 'priority')
if not status then
  return {'missing'}
end
if status ~= ARGV[2] or not same_attempt(attempt, ARGV[3]) then
  return {'conflict', status, attempt}
end
apply_state(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[4], ARGV[5], ARGV, 8,
  tonumber(ARGV[7]))
if ARGV[6] == '1' then
  local all = redis.call('HGETALL', KEYS[1])
  table.insert(all, 1, 'all')
  return all
end
return {'ok', cur[3] or '', cur[4] or ''}
