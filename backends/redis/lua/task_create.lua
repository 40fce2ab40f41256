-- KEYS: 1 task hash, 2 index of its status, 3 lease index, 4.. dependents sets of its parents
-- ARGV: 1 task id, 2 status score (updated_at, µs), 3 lease score ('' unless RUNNING),
--       4 dependents score (created_at, µs), 5.. field, value, field, value ...
-- Creates the task only if its hash does not exist. Returns 1 if created, 0 if it existed.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
for i = 4, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[4], ARGV[1])
end
return 1
