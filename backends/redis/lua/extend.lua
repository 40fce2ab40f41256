-- KEYS: 1 inflight
-- ARGV: 1 receipt (the delivery's header), 2 lease_ms
-- Extends a live lease to now + lease. Returns the new end (ms since the epoch, server clock),
-- or -1 when the receipt is stale or the lease already ended and the message went back.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return -1
end
local lease_until = now_ms() + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', lease_until, ARGV[1])
return lease_until
