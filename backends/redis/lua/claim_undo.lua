-- KEYS: 1 task hash, 2 lease index, 3 index of the status the task had before the claim
-- ARGV: 1 task id, 2 the claim's worker id, 3 its start (ISO-8601, as fetch_claim.lua wrote it),
--       4 the task's score in KEYS[3] before the claim, 5.. the hash's field, value pairs as
--       the claim found them
-- Undoes a claim that fetch_claim.lua made over a hash Rust then could not decode
-- (task_check.lua refuses what it can without a JSON parser of its own; cjson accepts text
-- serde_json refuses): compare-and-set on this claim (RUNNING, this worker, this start), then
-- the hash exactly as it was, and its index entry. Returns 1 when undone, 0 when the task moved
-- on meanwhile.
local cur = redis.call('HMGET', KEYS[1], 'status', 'worker_id', 'started_at')
if cur[1] ~= 'RUNNING' or cur[2] ~= ARGV[2] or cur[3] ~= ARGV[3] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
return 1
