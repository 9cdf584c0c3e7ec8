-- Record the end of a step (and of the sequences it closes), append its events and,
-- when it ends the run, the run's outcome: all in one round trip.
-- The first record is compare-and-set: a step already ended is not ended twice,
-- so a message Celery delivers twice cannot mark a step succeeded twice.
-- KEYS: run hash, events stream.
-- ARGV: n records, then n x (step key, record JSON, output JSON or '' for none),
--       m events, then m event JSONs,
--       final status ('' when the run goes on), retention seconds, then run field/value pairs.
-- Returns 'ok', 'dup' (first step had already ended: nothing written),
-- 'inactive' (records written, but the run had ended: do not continue), 'missing'.
local run = KEYS[1]
local status = redis.call('HGET', run, 'status')
if not status then
  return 'missing'
end
local n = tonumber(ARGV[1])
local first = redis.call('HGET', run, 's:' .. ARGV[2])
if first then
  local s = cjson.decode(first)['status']
  if s == 'succeeded' or s == 'skipped' or s == 'failed' or s == 'cancelled'
      or s == 'compensated' then
    return 'dup'
  end
end
local i = 2
for _ = 1, n do
  redis.call('HSET', run, 's:' .. ARGV[i], ARGV[i + 1])
  if ARGV[i + 2] ~= '' then
    redis.call('HSET', run, 'o:' .. ARGV[i], ARGV[i + 2])
  end
  i = i + 3
end
local m = tonumber(ARGV[i])
i = i + 1
for _ = 1, m do
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[i])
  i = i + 1
end
local active = status == 'running' or status == 'pending' or status == 'waiting'
if not active then
  return 'inactive'
end
local final = ARGV[i]
if final ~= '' then
  local ttl = tonumber(ARGV[i + 1])
  redis.call('HSET', run, 'status', final, unpack(ARGV, i + 2))
  redis.call('EXPIRE', run, ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return 'ok'
