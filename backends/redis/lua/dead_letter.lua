-- KEYS: 1 ready, 2 inflight, 3 dead, 4 bodies
-- ARGV: 1 receipt (the delivery's header), 2 reason, 3 dead-letter cap
-- Moves a live delivery to the dead letters. Returns 1, or 0 if the receipt was stale.
if not take_live(KEYS[1], KEYS[2], ARGV[1]) then
  return 0
end
bury(KEYS[3], KEYS[4], ARGV[1], ARGV[2], now_ms(), tonumber(ARGV[3]))
return 1
