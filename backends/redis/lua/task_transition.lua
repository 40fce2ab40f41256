-- KEYS: 1 task hash, 2 lease index, 3 index of the expected status, 4 index of the new status
-- ARGV: 1 task id, 2 expected status, 3 expected attempt, 4 new status score (µs),
--       5 lease score ('' unless the new status is RUNNING), 6 number of fields to set (n),
--       7 .. 6+2n field, value pairs, then the names of the fields to delete
-- Compare-and-set on (status, attempt); the status indexes and the lease index change in the
-- same step. The lab wrote statuses as 'TaskStatus.PENDING': read as 'PENDING'.
-- Returns {'ok', field, value, ...} (the task after the change), {'missing'} or
-- {'conflict', status, attempt}.
local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not cur[1] then
  return {'missing'}
end
local status = string.gsub(cur[1], '^TaskStatus%.', '')
local attempt = cur[2] or '0'
if status ~= ARGV[2] or tonumber(attempt) ~= tonumber(ARGV[3]) then
  return {'conflict', status, attempt}
end
local id = ARGV[1]
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', KEYS[2], id)
local n = tonumber(ARGV[6])
if n > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 7, 6 + 2 * n))
end
if #ARGV > 6 + 2 * n then
  redis.call('HDEL', KEYS[1], unpack(ARGV, 7 + 2 * n))
end
redis.call('ZADD', KEYS[4], ARGV[4], id)
if ARGV[5] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], id)
end
local all = redis.call('HGETALL', KEYS[1])
table.insert(all, 1, 'ok')
return all
