-- KEYS: 1 ready, 2 inflight, 3 bodies
-- ARGV: 1 receipt (the delivery's header)
-- Deletes the message if the receipt is still the live one. Returns 1 if deleted, 0 otherwise.
return remove_message(KEYS[1], KEYS[2], KEYS[3], ARGV[1])
