-- A worker process no longer runs a step: it ended, or the process died (orchestrator/
-- recovery.py). If the step's record still says that process runs it, the process died
-- mid-step: mark its lease lapsed (u = 0), so the message Celery gives back runs at once
-- instead of waiting for the lease (or the running record's own) to run out. Otherwise
-- drop that process's lease, if it still holds one.
-- KEYS: run hash.
-- ARGV: step key, Celery task id, worker ('<node>:<pid>'), and why the process let go
--       when it died ('timeout' after the hard time limit; else 'died').
-- Returns 1 when it changed something, else 0.
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local rec = redis.call('HGET', KEYS[1], 's:' .. ARGV[1])
if not rec then
  return 0
end
local lkey = 'l:' .. ARGV[1]
local r = cjson.decode(rec)
if r['status'] == RUNNING and r['task_id'] == ARGV[2] and r['worker'] == ARGV[3] then
  local held = redis.call('HGET', KEYS[1], lkey)
  if held then
    local l = cjson.decode(held)
    if l['u'] == 0 and l['t'] == ARGV[2] and l['w'] == ARGV[3] then
      return 0  -- lapsed already; keep the first word on why (the heartbeat's is later)
    end
  end
  redis.call('HSET', KEYS[1], lkey,
    cjson.encode({t = ARGV[2], w = ARGV[3], u = 0, why = ARGV[4] or 'died'}))
  return 1
end
local raw = redis.call('HGET', KEYS[1], lkey)
if not raw then
  return 0
end
local l = cjson.decode(raw)
if l['t'] ~= ARGV[2] or l['w'] ~= ARGV[3] then
  return 0
end
redis.call('HDEL', KEYS[1], lkey)
return 1
