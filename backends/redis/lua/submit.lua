-- KEYS: 1 ready, 2 seq (the queue's keys), 3 index of PENDING
-- ARGV: 1 message key prefix, 2 wake channel, 3 task key prefix, 4 events channel, then per
--       task: id, status score (µs), priority, event, n, then n field/value pairs
-- task_queue::Composed::submit in one step for new PENDING tasks of one queue: each task is
-- created unless its hash exists (as task_create.lua), its event published, and its message
-- ({"task_id": id}) added to the ready set (as enqueue.lua). The task hashes are not in KEYS:
-- see docs/backends/redis.md about Redis Cluster.
-- Returns one 1 (created) or 0 (the id was taken) per task.
local mp, tp = ARGV[1], ARGV[3]
local was_empty = redis.call('ZCARD', KEYS[1]) == 0
local out = {}
local new = {}
local i = 5
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 4])
  local key = tp .. id
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0
  else
    redis.call('HSET', key, unpack(ARGV, i + 5, i + 4 + 2 * n))
    redis.call('ZADD', KEYS[3], ARGV[i + 1], id)
    redis.call('PUBLISH', ARGV[4], ARGV[i + 3])
    new[#new + 1] = i
    out[#out + 1] = 1
  end
  i = i + 5 + 2 * n
end
if #new > 0 then
  local seq = redis.call('INCRBY', KEYS[2], #new) - #new
  for j = 1, #new do
    seq = seq + 1
    local at = new[j]
    add_ready(KEYS[1], mp .. seq, seq, ARGV[at + 2], '{"task_id":"' .. ARGV[at] .. '"}')
  end
  if was_empty then
    redis.call('PUBLISH', ARGV[2], '')
  end
end
return out
