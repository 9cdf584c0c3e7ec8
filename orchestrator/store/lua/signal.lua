-- Deliver a signal to a run. If a step waits for it, hand it the payload (the caller
-- then wakes the step); otherwise keep it, so a wait that starts later finds it.
-- KEYS: run hash, events stream, the run's pending-signal list for this name.
-- ARGV: signal name, payload JSON, event JSON, ttl.
-- Returns {'resume', step key}, {'kept'}, or {'inactive', status}.
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local run = KEYS[1]
local status = redis.call('HGET', run, 'status')
if not ACTIVE[status] then
  return {'inactive', status or 'missing'}
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])
local key = redis.call('HGET', run, 'ws:' .. ARGV[1])
if key then
  redis.call('HDEL', run, 'ws:' .. ARGV[1])
  redis.call('HSET', run, 'sp:' .. key, ARGV[2])
  return {'resume', key}
end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
return {'kept'}
