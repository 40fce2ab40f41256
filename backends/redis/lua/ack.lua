-- KEYS: 1 ready, 2 inflight, 3 message key
-- ARGV: 1 message id, 2 delivery number of the receipt
-- Deletes the message if the receipt is still the live one (a newer delivery or a nack makes
-- an old receipt stale). Returns 1 if deleted, 0 otherwise.
if redis.call('HGET', KEYS[3], 'l') ~= ARGV[2] then
  return 0
end
-- Usually leased; ready only if its lease ended and a fetch or stats promoted it.
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('DEL', KEYS[3])
return 1
