-- Claim a parked step for resumption: exactly one resumer wins, whoever woke it
-- (signal, decision, timer, a watched run ending). The run is `waiting` while any of
-- its steps waits, `running` again when none does.
-- KEYS: run hash. ARGV: step key. Returns 1 to the caller that must resume the step.
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local run = KEYS[1]
if redis.call('HDEL', run, 'w:' .. ARGV[1]) == 0 then
  return 0
end
local left = redis.call('HINCRBY', run, 'waits', -1)
if left <= 0 and redis.call('HGET', run, 'status') == WAITING then
  redis.call('HSET', run, 'status', RUNNING)
end
return 1
