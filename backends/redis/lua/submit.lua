-- KEYS: 1 ready, 2 seq, 3 bodies (the queue's keys), 4 index of PENDING
-- ARGV: 1 wake channel, 2 task key prefix, 3 events channel, then per task: id, status score
--       (µs), priority, event, n, then n field/value pairs
-- task_queue::Composed::submit in one step for new PENDING tasks of one queue: each task is
-- created unless its hash exists (as task_create.lua), its event published, and its message
-- ({"task_id": id}) added to the ready set (as enqueue.lua). The task hashes are not in KEYS;
-- on a cluster they carry the queue's hash tag, so they are in KEYS[1]'s slot (docs/backends/redis.md).
-- Returns one 1 (created) or 0 (the id was taken) per task.
local tp = ARGV[2]
local was_empty = redis.call('ZCARD', KEYS[1]) == 0
local events = listened(ARGV[3])
-- One EXISTS for the whole batch: only when some id is taken is each one asked about.
local keys = {}
local i = 4
while i <= #ARGV do
  keys[#keys + 1] = tp .. ARGV[i]
  i = i + 5 + 2 * tonumber(ARGV[i + 4])
end
local taken = 0
for j = 1, #keys, 1000 do
  taken = taken + redis.call('EXISTS', unpack(keys, j, math.min(#keys, j + 999)))
end
local out = {}
local new = {}
local seen = {}
local pending = {}
local k = 0
i = 4
while i <= #ARGV do
  local id, n = ARGV[i], tonumber(ARGV[i + 4])
  k = k + 1
  local key = keys[k]
  -- (a batch may name one id twice: the second finds the hash the first created)
  if taken > 0 and redis.call('EXISTS', key) == 1 or seen[id] then
    out[#out + 1] = 0
  else
    redis.call('HSET', key, unpack(ARGV, i + 5, i + 4 + 2 * n))
    if events then
      publish_advisory(ARGV[3], ARGV[i + 3])
    end
    pending[#pending + 1] = ARGV[i + 1]
    pending[#pending + 1] = id
    new[#new + 1] = i
    seen[id] = true
    out[#out + 1] = 1
  end
  i = i + 5 + 2 * n
end
if #new > 0 then
  call_chunked('ZADD', KEYS[4], pending)
  local seq = redis.call('INCRBY', KEYS[2], #new) - #new
  local bodies = {}
  local ready = {}
  for j = 1, #new do
    seq = seq + 1
    local at = new[j]
    local sid = num(seq)
    bodies[#bodies + 1] = sid
    bodies[#bodies + 1] = '{"task_id":"' .. ARGV[at] .. '"}'
    ready[#ready + 1] = ready_score(ARGV[at + 2], seq)
    ready[#ready + 1] = header(sid, '0', ARGV[at + 2], sid)
  end
  call_chunked('HSET', KEYS[3], bodies)
  call_chunked('ZADD', KEYS[1], ready)
  if was_empty then
    publish_advisory(ARGV[1], '')
  end
end
return out
