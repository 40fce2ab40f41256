-- Shared by the registry scripts that change a task's state (prepended at build time).

-- The status (the lab wrote 'TaskStatus.PENDING': read as 'PENDING') and attempt (as stored:
-- we write it in decimal; the lab wrote none, which reads as '0') of an `HMGET key status
-- attempt ...` reply, and the reply. Nil when the task does not exist.
local function status_of(cur)
  local status = cur[1]
  if not status then
    return nil
  end
  if string.byte(status, 1) == 84 then -- 'T'
    status = string.gsub(status, '^TaskStatus%.', '')
  end
  return status, cur[2] or '0', cur
end

-- Reads a task's status and attempt, plus the named extra fields (as status_of).
local function task_status(key, ...)
  return status_of(redis.call('HMGET', key, 'status', 'attempt', ...))
end

-- Appends `a` (and `b`, if given) to the list t[key], creating the list.
local function push(t, key, a, b)
  local l = t[key]
  if not l then
    l = {}
    t[key] = l
  end
  l[#l + 1] = a
  if b then
    l[#l + 1] = b
  end
end

-- Whether a stored attempt (text) is the expected one: compared as text first (we write plain
-- decimal), as numbers only when the texts differ (a value edited by hand, such as ' 1').
local function same_attempt(stored, expected)
  return stored == expected or tonumber(stored) == tonumber(expected)
end

-- Writes a new state: `n` field/value pairs from args[first], then deletes the fields named
-- after them (to the end of args). The task moves from the index of its old status to the
-- index of the new one (score: updated_at in µs). The index of RUNNING is the lease index
-- (score: the lease score, '' when the new status is not RUNNING).
local function apply_state(key, leases, from_index, to_index, id, score, lease, args, first, n)
  if from_index ~= to_index then
    redis.call('ZREM', from_index, id)
  end
  if n > 0 then
    redis.call('HSET', key, unpack(args, first, first + 2 * n - 1))
  end
  if #args >= first + 2 * n then
    redis.call('HDEL', key, unpack(args, first + 2 * n))
  end
  if lease ~= '' then
    redis.call('ZADD', leases, lease, id)
  else
    redis.call('ZADD', to_index, score, id)
  end
end
