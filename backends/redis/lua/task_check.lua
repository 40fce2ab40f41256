-- Shared by fetch_claim.lua (prepended at build time): codec::decode's rules for what decides a
-- claim (`status`, `attempt`, `handed_back`, `max_attempts`) and for what a hand edit most
-- likely spoils at no cost to check (a missing `status`, `payload` or `created_at`, a `priority`
-- that is no number, a `task_id` naming another task), so that the claim does not write over
-- such a hash. Each check accepts at most what Rust accepts. What needs a parser (the JSON of
-- `payload` and `depends_on`, the times, the queue name, UTF-8) is left to Rust: this runs for
-- every claim, Lua's patterns cost about 15 ns a character, and cjson would still disagree with
-- serde_json (it reads NaN, 0x10, 01, raw tabs in strings). A claim over a hash Rust then
-- refuses is undone (claim_undo.lua) before its message is dead-lettered.

-- A decimal integer as Rust's `text.trim_ascii().parse::<i64>()` reads it: ASCII whitespace
-- (space, \t, \n, \f, \r; not \v), a sign, digits.
local INT = '^[ \t\n\f\r]*([+-]?)(%d+)[ \t\n\f\r]*$'

-- The integer `v` (text) if it is one within lo..hi; else nil and why.
local function checked_int(v, lo, hi)
  local n
  local b = #v == 1 and string.byte(v)
  if b and b >= 48 and b <= 57 then
    n = b - 48 -- what we write, most often
  elseif #v <= 9 and string.find(v, '^%d+$') then
    n = tonumber(v)
  else
    local sign, digits = string.match(v, INT)
    if not digits then
      return nil, string.format('%q is not an integer', v)
    end
    digits = string.gsub(digits, '^0+', '')
    n = 0
    if #digits > 0 then
      if #digits > 10 then
        return nil, string.format('%q is out of range', v)
      end
      n = tonumber(digits)
    end
    if sign == '-' then
      n = -n
    end
  end
  if n < lo or n > hi then
    return nil, string.format('%q is out of range', v)
  end
  return n
end

-- Whether `id`, made of [%w_.:%-] already, meets the rest of the model's rule for a task id
-- (model::validate_name): at most 128 characters, the first a letter or digit.
local function valid_matched_id(id)
  return #id <= 128 and string.find(id, '^%w') ~= nil
end

local STATUSES = {WAITING = true, PENDING = true, RUNNING = true, COMPLETED = true,
  FAILED = true, CANCELLED = true}

local function bad(field, why)
  return 'stored task field `' .. field .. '`: ' .. why
end

-- Why the task `id` whose fields (nil when absent) are these is not one codec::decode reads
-- (nil when it is), then its status as Rust reads it.
local function task_unreadable(id, task_id, status, payload, created_at, priority, attempt,
    handed_back, max_attempts)
  if task_id and task_id ~= id then
    return bad('task_id', string.format('%q is not the id %q of its key', task_id, id))
  end
  if not status then
    return bad('status', 'missing')
  end
  local raw = status
  if not STATUSES[status] then
    -- The lab's 'TaskStatus.PENDING'; any case, as TaskStatus::from_str.
    status = string.upper((string.gsub(status, '^TaskStatus%.', '')))
    if not STATUSES[status] then
      return bad('status', string.format('unknown status %q', raw))
    end
  end
  if not payload then
    return bad('payload', 'missing')
  end
  if not created_at then
    return bad('created_at', 'missing')
  end
  if priority then
    local _, why = checked_int(priority, 1, 10)
    if why then
      return bad('priority', why .. ' (1..=10)')
    end
  end
  if attempt then
    local _, why = checked_int(attempt, 0, 4294967295)
    if why then
      return bad('attempt', why)
    end
  end
  if handed_back then
    local _, why = checked_int(handed_back, 0, 4294967295)
    if why then
      return bad('handed_back', why)
    end
  end
  if max_attempts then
    local _, why = checked_int(max_attempts, 0, 4294967295)
    if why then
      return bad('max_attempts', why)
    end
  end
  return nil, status
end
