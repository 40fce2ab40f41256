-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 dead, 6 bodies
-- ARGV: 1 max, 2 lease_ms, 3 max deliveries, 4 dead-letter reason, 5 dead-letter cap,
--       6 wake channel
-- One fetch: see lease_batch in queue_prelude.lua for what it does and returns.
return lease_batch(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], tonumber(ARGV[1]),
  tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5]), ARGV[6])
