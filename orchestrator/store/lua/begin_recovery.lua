-- A run failed: enter the recovery phase once (compensations, then onFailure).
-- From now on only recovery steps may start; steps still running elsewhere record
-- their outcome but do not continue the run.
-- KEYS: run hash, events stream, compensation list. ARGV: error JSON, event JSON.
-- Returns the compensation list (completion order), or false when the run is not
-- active or already recovering (someone else handles this failure).
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local status = redis.call('HGET', KEYS[1], 'status')
if not ACTIVE[status] then
  return false
end
if redis.call('HSETNX', KEYS[1], 'phase', 'recovery') == 0 then
  return false
end
redis.call('HSET', KEYS[1], 'error', ARGV[1])
redis.call('XADD', KEYS[2], '*', 'e', ARGV[2])
return redis.call('LRANGE', KEYS[3], 0, -1)
