-- Shared by fetch_claim.lua (prepended at build time): codec::decode's rules for the fields a
-- claim reads or a hand edit most likely spoils, so that the claim does not write over a task
-- hash Rust cannot read. Each check accepts at most what Rust accepts. The JSON fields
-- (`payload`, `depends_on`) are left to serde_json: a JSON parser here (cjson) would cost every
-- claim and still disagree with it (cjson reads NaN, 0x10, 01, raw tabs in strings); a claim
-- over a hash Rust then refuses is undone (claim_undo.lua).

-- ASCII whitespace as Rust's `str::trim_ascii`: space, \t, \n, \f, \r (not \v).
local WS = '[ \t\n\f\r]*'

-- A decimal integer as Rust's `text.trim_ascii().parse::<i64>()`, within lo..hi; the number,
-- or nil and why.
local function checked_int(v, lo, hi)
  local sign, digits = string.match(v, '^' .. WS .. '([+-]?)(%d+)' .. WS .. '$')
  if not digits then
    return nil, string.format('%q is not an integer', v)
  end
  digits = string.gsub(digits, '^0+', '')
  local n = 0
  if #digits > 0 then
    if #digits > 10 then
      return nil, string.format('%q is out of range', v)
    end
    n = tonumber(digits)
  end
  if sign == '-' then
    n = -n
  end
  if n < lo or n > hi then
    return nil, string.format('%q is out of range', v)
  end
  return n
end

-- Whether `s` is valid UTF-8 (Rust reads every field as text). Plain ASCII, the usual case, is
-- one scan in C.
local function utf8_ok(s)
  if not string.find(s, '[\128-\255]') then
    return true
  end
  local i, n = 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local len, min
    if c < 128 then
      len, min = 1, 0
    elseif c >= 194 and c <= 223 then
      len, min = 2, 128
    elseif c >= 224 and c <= 239 then
      len, min = 3, 2048
    elseif c >= 240 and c <= 244 then
      len, min = 4, 65536
    else
      return false
    end
    if len > 1 then
      if i + len - 1 > n then
        return false
      end
      local cp = c % (2 ^ (7 - len))
      for k = i + 1, i + len - 1 do
        local b = string.byte(s, k)
        if b < 128 or b > 191 then
          return false
        end
        cp = cp * 64 + (b - 128)
      end
      if cp < min or cp > 1114111 or (cp >= 55296 and cp <= 57343) then
        return false
      end
    end
    i = i + len
  end
  return true
end

-- The model's rules for a task id and a queue name (model::validate_name).
local function valid_id(s)
  return #s <= 128 and string.match(s, '^%w[%w_.:%-]*$') ~= nil
end
local function valid_queue(s)
  return #s <= 64 and string.match(s, '^%w[%w_%-]*$') ~= nil
end

local DAYS = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31}

-- A time codec::parse_time reads: 'YYYY-MM-DD', 'T', 'HH:MM:SS', a fraction of up to 9 digits,
-- then 'Z', '+HH:MM', '-HH:MM' or nothing (UTC); or with ' ' for 'T' and nothing after; every
-- part in its range (chrono accepts a little more: a leap second, longer fractions).
local function valid_time(s)
  local y, mo, d, sep, h, mi, sec, rest = string.match(s,
    '^(%d%d%d%d)%-(%d%d)%-(%d%d)([T ])(%d%d):(%d%d):(%d%d)(.*)$')
  if not y then
    return false
  end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  if mo < 1 or mo > 12 or d < 1 then
    return false
  end
  local days = DAYS[mo]
  if mo == 2 and y % 4 == 0 and (y % 100 ~= 0 or y % 400 == 0) then
    days = 29
  end
  if d > days or tonumber(h) > 23 or tonumber(mi) > 59 or tonumber(sec) > 59 then
    return false
  end
  local frac = string.match(rest, '^%.(%d+)')
  if frac then
    if #frac > 9 then
      return false
    end
    rest = string.sub(rest, #frac + 2)
  end
  if rest == '' then
    return true
  end
  if sep ~= 'T' then
    return false
  end
  if rest == 'Z' then
    return true
  end
  local oh, om = string.match(rest, '^[+-](%d%d):(%d%d)$')
  return oh ~= nil and tonumber(oh) <= 23 and tonumber(om) <= 59
end

local STATUSES = {WAITING = true, PENDING = true, RUNNING = true, COMPLETED = true,
  FAILED = true, CANCELLED = true}
local TIMES = {'created_at', 'updated_at', 'lease_until', 'heartbeat_at', 'started_at',
  'finished_at', 'ready_at'}

-- Why the HGETALL reply `all` of task `id` is not a task codec::decode reads, or nil. `f` is
-- the table field -> value of `all`.
local function task_unreadable(id, f, all)
  local function bad(field, why)
    return 'stored task field `' .. field .. '`: ' .. why
  end
  for i = 1, #all, 2 do
    if not utf8_ok(all[i]) then
      return 'a stored task field name is not UTF-8'
    end
    if not utf8_ok(all[i + 1]) then
      return bad(all[i], 'is not UTF-8')
    end
  end
  if f.task_id and f.task_id ~= id then
    return bad('task_id', string.format('%q is not the id %q of its key', f.task_id, id))
  end
  if f.queue and not valid_queue(f.queue) then
    return bad('queue', string.format('%q is not a queue name', f.queue))
  end
  if not f.status then
    return bad('status', 'missing')
  end
  local status = string.upper(string.gsub(f.status, '^TaskStatus%.', ''))
  if not STATUSES[status] then
    return bad('status', string.format('unknown status %q', f.status))
  end
  if not f.payload then
    return bad('payload', 'missing')
  end
  if not f.created_at then
    return bad('created_at', 'missing')
  end
  for _, name in ipairs(TIMES) do
    if f[name] and not valid_time(f[name]) then
      return bad(name, string.format('%q is not an ISO-8601 time', f[name]))
    end
  end
  if f.priority then
    local _, why = checked_int(f.priority, 1, 10)
    if why then
      return bad('priority', why .. ' (1..=10)')
    end
  end
  for _, name in ipairs({'attempt', 'handed_back', 'max_attempts'}) do
    if f[name] then
      local _, why = checked_int(f[name], 0, 4294967295)
      if why then
        return bad(name, why)
      end
    end
  end
  return nil, status
end
