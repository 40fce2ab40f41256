-- KEYS: 1 ready, 2 inflight, 3 dead, 4 message key
-- ARGV: 1 message id, 2 delivery number of the receipt, 3 reason, 4 dead-letter cap,
--       5 message key prefix
-- Moves a live delivery to the dead letters. Returns 1, or 0 if the receipt was stale.
if redis.call('HGET', KEYS[4], 'l') ~= ARGV[2] then
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
bury(KEYS[3], KEYS[4], ARGV[1], ARGV[3], now_ms(), tonumber(ARGV[4]), ARGV[5])
return 1
