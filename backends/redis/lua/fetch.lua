-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 dead
-- ARGV: 1 message key prefix, 2 max, 3 lease_ms, 4 max deliveries, 5 dead-letter reason,
--       6 dead-letter cap, 7 wake channel
-- One fetch: see lease_batch in queue_prelude.lua for what it does and returns.
return lease_batch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6]), ARGV[7])
