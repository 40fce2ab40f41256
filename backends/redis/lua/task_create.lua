-- KEYS: 1 task hash, 2 index of its status, 3 lease index (all of its queue's slot)
-- ARGV: 1 task id, 2 status score (updated_at, µs), 3 lease score ('' unless RUNNING),
--       4.. field, value, field, value ...
-- Creates the task only if its hash does not exist. Returns 1 if created, 0 if it existed.
-- Its entries in its parents' dependents sets (in the parents' queues' slots) were added
-- before this runs (docs/backends/redis.md, "Steps that span queues").
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
end
return 1
