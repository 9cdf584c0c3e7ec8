-- Count one arrival at a fan-in (a parallel branch or a forEach item that ended).
-- Arrivals are a set, so a redelivered message counts once; the last arrival wins
-- a flag in the run hash, so exactly one worker continues the run.
-- KEYS: arrivals set, run hash. ARGV: member, expected count, flag field, ttl.
-- Returns 1 to the one caller that must continue, else 0.
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  if redis.call('HSETNX', KEYS[2], ARGV[3], '1') == 1 then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 0
