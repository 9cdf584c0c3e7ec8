-- Park a step that waits (approval, sleep, signal, another run): the run keeps no
-- worker busy; a signal, a decision or the timer tick resumes it (see unpark.lua).
-- KEYS: run hash, events stream, the run's pending-signal list for this wait's signal.
-- ARGV: step key, waiting record JSON, wait JSON, event JSON, signal name ('' for none).
-- Returns {'parked'}, {'signalled', payload} when the signal had already arrived (kept
-- until now, so the step ends at once), {'inactive'} or {'dup'}.
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local run = KEYS[1]
local status = redis.call('HGET', run, 'status')
if not ACTIVE[status] then
  return {'inactive'}
end
local skey = 's:' .. ARGV[1]
local rec = redis.call('HGET', run, skey)
if rec then
  local s = cjson.decode(rec)['status']
  -- Unlike begin_step.lua, a compensated record does not make this message a duplicate.
  if TERMINAL_STEP[s] and s ~= COMPENSATED then
    return {'dup'}
  end
end
if ARGV[5] ~= '' then
  local payload = redis.call('LPOP', KEYS[3])
  if payload then
    return {'signalled', payload}
  end
  redis.call('HSET', run, 'ws:' .. ARGV[5], ARGV[1])
end
redis.call('HSET', run, skey, ARGV[2], 'w:' .. ARGV[1], ARGV[3])
redis.call('HINCRBY', run, 'waits', 1)
redis.call('HSET', run, 'status', WAITING)
redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
return {'parked'}
