-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq
-- ARGV: 1 receipt (the delivery's header), 2 delay_ms, 3 wake channel
-- Gives a live delivery back. Returns 1 if given back, 0 if the receipt was stale.
return give_back(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], tonumber(ARGV[2]), ARGV[3])
