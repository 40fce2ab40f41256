-- KEYS: 1 task hash, 2 lease index, 3 index of the expected status, 4 index of the new status
-- ARGV: 1 task id, 2 expected status, 3 expected attempt, 4 new status score (µs),
--       5 lease score ('' unless the new status is RUNNING), 6 '1' to return every field
--       (the caller does not know the task's immutable part), 7 number of fields to set (n),
--       8 .. 7+2n field, value pairs, then the names of the fields to delete
-- Compare-and-set on (status, attempt); the status indexes and the lease index change in the
-- same step. The lab wrote statuses as 'TaskStatus.PENDING': read as 'PENDING'.
-- Returns {'all', field, value, ...} (the task after the change) when asked, else
-- {'ok', created_at, priority} (for the caller to check its copy of the immutable part);
-- {'missing'} or {'conflict', status, attempt} when nothing changed.
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'created_at', 'priority')
local status = cur[1]
if not status then
  return {'missing'}
end
if string.byte(status, 1) == 84 then -- 'T'
  status = string.gsub(status, '^TaskStatus%.', '')
end
local attempt = cur[2] or '0'
if status ~= ARGV[2] or tonumber(attempt) ~= tonumber(ARGV[3]) then
  return {'conflict', status, attempt}
end
local id = ARGV[1]
if KEYS[3] ~= KEYS[4] then
  redis.call('ZREM', KEYS[3], id)
end
if status == 'RUNNING' and ARGV[5] == '' then
  redis.call('ZREM', KEYS[2], id)
end
local n = tonumber(ARGV[7])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 8, 7 + 2 * n))
end
if #ARGV > 7 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 8 + 2 * n))
end
redis.call('ZADD', KEYS[4], ARGV[4], id)
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], id)
end
if ARGV[6] == '1' then
  local all = redis.call('HGETALL', KEYS[1])
  table.insert(all, 1, 'all')
  return all
end
return {'ok', cur[3] or '', cur[4] or ''}
