-- Renew the lease of a step that a worker process is running now (orchestrator/recovery.py).
-- A live lease says "this execution is alive": a second delivery of the same message finds
-- it and waits (begin_step.lua answers 'held') instead of running the step twice at once.
-- KEYS: run hash.
-- ARGV: step key, Celery task id, worker ('<node>:<pid>', as in step records), lease length
--       in seconds.
-- Writes l:<key> = {t: task id, w: worker, u: lease end, epoch seconds by Redis' clock so
-- that workers' clocks need not agree} only while the step's record says it runs under that
-- task id in that process. Returns 1 then, else 0 (the step ended, or runs elsewhere now,
-- or the run is gone: nothing to renew).
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local rec = redis.call('HGET', KEYS[1], 's:' .. ARGV[1])
if not rec then
  return 0
end
local r = cjson.decode(rec)
if r['status'] ~= RUNNING or r['task_id'] ~= ARGV[2] or r['worker'] ~= ARGV[3] then
  return 0
end
local held = redis.call('HGET', KEYS[1], 'l:' .. ARGV[1])
if held then
  local l = cjson.decode(held)
  if l['u'] == 0 and l['t'] == ARGV[2] and l['w'] == ARGV[3] then
    return 0  -- that process died (release_lease.lua): a late heartbeat must not revive it
  end
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'l:' .. ARGV[1],
  cjson.encode({t = ARGV[2], w = ARGV[3], u = now[1] + now[2] / 1e6 + ARGV[4]}))
return 1
