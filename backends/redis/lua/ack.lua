-- KEYS: 1 ready, 2 inflight, 3 message key
-- ARGV: 1 message id, 2 delivery number of the receipt
-- Deletes the message if the receipt is still the live one. Returns 1 if deleted, 0 otherwise.
return remove_message(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2])
