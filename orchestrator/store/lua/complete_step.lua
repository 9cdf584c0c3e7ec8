-- Record the end of a step (and of the sequences it closes), append its events and,
-- when it ends the run, the run's outcome: all in one round trip.
-- The first record is compare-and-set: a step already ended is not ended twice,
-- so a message Celery delivers twice cannot mark a step succeeded twice.
-- KEYS: run hash, events stream, compensation list (steps with `compensate` that
--       succeeded, in order of completion).
-- ARGV: recovery ('1' for compensation/onFailure steps), n records, then
--       n x (step key, record JSON, output JSON or '' for none), m events, m event JSONs,
--       k compensable keys to append, k keys,
--       final status ('' when the run goes on), retention seconds, then run field/value pairs.
-- Returns 'ok', 'dup' (first step had already ended: nothing written),
-- 'inactive' (records written, but the run had ended or is recovering: do not continue),
-- 'missing'.
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local run = KEYS[1]
local status = redis.call('HGET', run, 'status')
if not status then
  return 'missing'
end
local first = redis.call('HGET', run, 's:' .. ARGV[3])
if first then
  local s = cjson.decode(first)['status']
  if TERMINAL_STEP[s] then
    return 'dup'
  end
end
local n = tonumber(ARGV[2])
local i = 3
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
local k = tonumber(ARGV[i])
i = i + 1
for _ = 1, k do
  redis.call('RPUSH', KEYS[3], ARGV[i])
  i = i + 1
end
if not ACTIVE[status] then
  return 'inactive'
end
if ARGV[1] ~= '1' and redis.call('HEXISTS', run, 'phase') == 1 then
  return 'inactive'
end
local final = ARGV[i]
if final ~= '' then
  local ttl = tonumber(ARGV[i + 1])
  redis.call('HSET', run, 'status', final, unpack(ARGV, i + 2))
  redis.call('HDEL', run, 'phase')
  redis.call('EXPIRE', run, ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return 'ok'
