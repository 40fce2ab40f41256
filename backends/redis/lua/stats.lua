-- KEYS: 1 ready, 2 delayed, 3 inflight, 4 seq, 5 dead, 6 bodies
-- Promotes what is due (so that expired leases count as waiting), then returns
-- {waiting, in_flight, dead}.
promote(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[6], now_ms())
return {
  redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]),
  redis.call('ZCARD', KEYS[3]),
  redis.call('LLEN', KEYS[5]),
}
