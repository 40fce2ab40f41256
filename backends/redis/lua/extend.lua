-- KEYS: 1 inflight, 2 message key
-- ARGV: 1 message id, 2 delivery number of the receipt, 3 lease_ms
-- Extends a live lease to now + lease. Returns the new end (ms since the epoch, server clock),
-- or -1 when the receipt is stale or the lease already ended and the message went back.
if redis.call('HGET', KEYS[2], 'l') ~= ARGV[2] or not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return -1
end
local lease_until = now_ms() + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], 'XX', num(lease_until), ARGV[1])
return lease_until
