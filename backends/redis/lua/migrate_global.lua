-- Moves entries of one key of the layout before 2026-12-07, whose registry indexes were global
-- ({prefix}orchestra:status:<STATUS>, {prefix}orchestra:leases, {prefix}orchestra:dependents:<id>),
-- to the per-queue keys of today's layout (docs/backends/redis.md, "Migrating from the layout
-- before 2026-12-07"). One server only: that layout never ran on a cluster, and the keys built
-- here are not declared.
-- KEYS: none
-- ARGV: 1 prefix, 2 the lab's default queue, 3 most entries per call, 4 the old key,
--       5 '' for an index, else the parent id whose dependents set ARGV[4] is
-- An index entry goes to the index of the status its task's hash holds now (the hash is the
-- truth; a task whose hash is gone is dropped), keeping its score; its queue is added to
-- {prefix}orchestra:queues. A dependents set is merged into its parent's queue's set (dropped
-- when the parent is gone). Returns the number of entries left in the old key.
local prefix, default_queue, most, old, parent = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]

-- The queue (nil: no such task) and status (as our index names it) of a task.
local function queue_and_status(id)
  local h = redis.call('HMGET', prefix .. 'task_registry:' .. id, 'queue', 'status')
  if not h[2] then
    return nil
  end
  local status = string.upper(string.gsub(h[2], '^TaskStatus%.', ''))
  return h[1] or default_queue, status
end

local known = {WAITING = true, PENDING = true, RUNNING = true, COMPLETED = true, FAILED = true,
  CANCELLED = true}

local function base(queue)
  return prefix .. 'q:{' .. queue .. '}'
end

if parent ~= '' then
  local queue = queue_and_status(parent)
  if queue then
    local new = base(queue) .. ':dependents:' .. parent
    redis.call('ZUNIONSTORE', new, 2, new, old)
    redis.call('SADD', prefix .. 'orchestra:queues', queue)
  end
  redis.call('DEL', old)
  return 0
end

local entries = redis.call('ZRANGE', old, 0, most - 1, 'WITHSCORES')
local done = {}
local queues = {}
for i = 1, #entries, 2 do
  local id, score = entries[i], entries[i + 1]
  local queue, status = queue_and_status(id)
  -- (a status edited by hand into something else is left out of every index, as the get of
  -- such a task fails anyway)
  if queue and known[status] then
    local index
    if status == 'RUNNING' then
      index = base(queue) .. ':leases'
    else
      index = base(queue) .. ':status:' .. status
    end
    redis.call('ZADD', index, score, id)
    queues[queue] = true
  end
  done[#done + 1] = id
end
for q in pairs(queues) do
  redis.call('SADD', prefix .. 'orchestra:queues', q)
end
if #done > 0 then
  redis.call('ZREM', old, unpack(done))
end
return redis.call('ZCARD', old)
