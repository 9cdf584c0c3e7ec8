-- One forEach item ended. Arrivals are a set (a redelivered item counts once); each
-- first arrival frees a concurrency slot, so it also claims the next item to start.
-- KEYS: arrivals set, run hash. ARGV: item index, forEach key, ttl.
-- Returns {fired, next}: fired = 1 for the one caller that completes the forEach;
-- next = index of the item this caller must start, or -1.
local added = redis.call('SADD', KEYS[1], ARGV[1])
local total = tonumber(redis.call('HGET', KEYS[2], 'n:' .. ARGV[2]) or '0')
local nxt = -1
if added == 1 then
  -- The started count is fc:<key>; a run started before that name (rolling deploy)
  -- keeps it in c:<key>, so count in that field when only it exists.
  local counter = 'fc:' .. ARGV[2]
  if redis.call('HEXISTS', KEYS[2], counter) == 0
      and redis.call('HEXISTS', KEYS[2], 'c:' .. ARGV[2]) == 1 then
    counter = 'c:' .. ARGV[2]
  end
  local started = redis.call('HINCRBY', KEYS[2], counter, 1)
  if started <= total then
    nxt = started - 1
  end
end
if redis.call('SCARD', KEYS[1]) >= total then
  if redis.call('HSETNX', KEYS[2], 'f:' .. ARGV[2], '1') == 1 then
    redis.call('DEL', KEYS[1])
    return {1, nxt}
  end
  return {0, nxt}
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {0, nxt}
