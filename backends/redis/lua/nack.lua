-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 message key
-- ARGV: 1 message id, 2 delivery number of the receipt, 3 delay_ms, 4 wake channel
-- Gives a live delivery back. Returns 1 if given back, 0 if the receipt was stale.
return give_back(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], ARGV[1], ARGV[2],
  tonumber(ARGV[3]), ARGV[4])
