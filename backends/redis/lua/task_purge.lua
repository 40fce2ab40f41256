-- KEYS: 1 index of a finished status of one queue, 2 that queue's lease index, 3 its list of
--       purged tasks whose entries in other slots are still to be removed
-- ARGV: 1 the queue's task key prefix, 2 age cut score (µs; '' for none), 3 how many to keep
--       ('' for no limit), 4 batch size, 5 the queue's dependents key prefix
-- Deletes the oldest tasks of the index that are older than the cut or beyond the count (both
-- are prefixes of the index, so the longer prefix is deleted), at most `batch` per call: the
-- hash, the index entries and the task's own dependents set. Its entries in its parents'
-- dependents sets (and, on a cluster, its id pointer) live in other slots: the script appends
-- `id`, `depends_on` (JSON text, '' for none) to KEYS[3], which the caller works off after
-- this (and the next purge again if it died before). Returns how many were deleted.
local tp, dp = ARGV[1], ARGV[5]
local k = 0
if ARGV[3] ~= '' then
  k = math.max(0, redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[3]))
end
if ARGV[2] ~= '' then
  k = math.max(k, redis.call('ZCOUNT', KEYS[1], '-inf', '(' .. ARGV[2]))
end
k = math.min(k, tonumber(ARGV[4]))
if k <= 0 then
  return 0
end
local ids = redis.call('ZRANGE', KEYS[1], 0, k - 1)
local done = {}
for i = 1, #ids do
  local id = ids[i]
  local key = tp .. id
  local deps = redis.call('HGET', key, 'depends_on')
  done[#done + 1] = id
  done[#done + 1] = deps or ''
  redis.call('DEL', key, dp .. id)
end
redis.call('RPUSH', KEYS[3], unpack(done))
redis.call('ZREM', KEYS[1], unpack(ids))
redis.call('ZREM', KEYS[2], unpack(ids))
return #ids
