-- Create a run unless it exists (a second trigger with the same idempotency key
-- lands here with the same id). KEYS: run hash, events stream.
-- ARGV: event JSON, then field/value pairs of the run hash. Returns 1 if created.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('XADD', KEYS[2], '*', 'e', ARGV[1])
return 1
