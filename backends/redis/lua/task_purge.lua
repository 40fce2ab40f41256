-- KEYS: 1 index of a finished status, 2 lease index
-- ARGV: 1 key prefix, 2 age cut score (µs; '' for none), 3 how many to keep ('' for no limit),
--       4 batch size
-- Deletes the oldest tasks of the index that are older than the cut or beyond the count (both
-- are prefixes of the index, so the longer prefix is deleted), at most `batch` per call: the
-- hash, the index entries, the task's own dependents set, and its entry in each parent's
-- dependents set. The task hashes are not in KEYS (the ids are read here): see
-- docs/backends/redis.md about Redis Cluster. Returns how many were deleted.
local prefix = ARGV[1]
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
for i = 1, #ids do
  local id = ids[i]
  local key = prefix .. 'task_registry:' .. id
  local deps = redis.call('HGET', key, 'depends_on')
  if deps and deps ~= '' then
    local ok, parents = pcall(cjson.decode, deps)
    if ok and type(parents) == 'table' then
      for j = 1, #parents do
        redis.call('ZREM', prefix .. 'orchestra:dependents:' .. tostring(parents[j]), id)
      end
    end
  end
  redis.call('DEL', key, prefix .. 'orchestra:dependents:' .. id)
end
redis.call('ZREM', KEYS[1], unpack(ids))
redis.call('ZREM', KEYS[2], unpack(ids))
return #ids
