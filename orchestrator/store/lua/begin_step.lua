-- Read what a step needs and, when asked, mark it running: one round trip per step start.
-- KEYS: run hash, events stream.
-- ARGV: step key, Celery task id, mark ('1'|'0'), running record JSON, event JSON, now,
--       recovery ('1' for compensation and onFailure steps), then the run-hash fields
--       to read (inputs, s:<ref>, o:<ref>, ...).
-- Returns {verdict, run status, step record, value...} where verdict is
--   run      the caller executes the step (marked running when mark = '1');
--   done     the step already ended (a redelivered message): do not run it again;
--   busy     another message (another task id) is running it now;
--   held     this message again while the execution it started still runs: its lease
--            is live (orchestrator/recovery.py); come back later;
--   lost     this message again after the execution it started died (its lease lapsed:
--            the worker was killed, exited, or hit the hard time limit); with mark = '1'
--            the new running record counts it (``lost``: deaths of this attempt so far,
--            ``lost_why``: 'timeout' or 'died') and is returned as the step record;
--   inactive the run is not active (cancelled, failed, ...), or is recovering from a
--            failure and this is not a recovery step; missing: no such run.
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local run = KEYS[1]
local status = redis.call('HGET', run, 'status')
if not status then
  return {'missing', false, false}
end
if not ACTIVE[status] then
  return {'inactive', status, false}
end
if ARGV[7] ~= '1' and redis.call('HEXISTS', run, 'phase') == 1 then
  return {'inactive', status, false}
end
local skey = 's:' .. ARGV[1]
local rec = redis.call('HGET', run, skey)
local verdict = 'run'
if rec then
  local r = cjson.decode(rec)
  local s = r['status']
  if TERMINAL_STEP[s] then
    verdict = 'done'
  elseif s == RUNNING and r['task_id'] ~= ARGV[2] then
    return {'busy', status, rec}
  elseif s == RUNNING then
    -- Live until its lease ends (l:<key>, renewed by its worker's heartbeat) or, before
    -- the first heartbeat, until started_at + lease: the running record says how long.
    local untl = r['lease'] and r['started_at'] + r['lease']
    local raw = redis.call('HGET', run, 'l:' .. ARGV[1])
    if raw then
      local l = cjson.decode(raw)
      if l['t'] == r['task_id'] and l['w'] == r['worker'] then
        untl = l['u']
      end
    end
    local now = redis.call('TIME')
    if untl and untl > now[1] + now[2] / 1e6 then
      return {'held', status, rec}
    end
    if ARGV[3] == '1' then
      local new = cjson.decode(ARGV[4])
      new['lost'] = (r['lost'] or 0) + 1
      new['lost_why'] = (raw and cjson.decode(raw)['why']) or 'died'
      rec = cjson.encode(new)
      ARGV[4] = rec
      verdict = 'lost'
      redis.call('HDEL', run, 'l:' .. ARGV[1])
    end
  end
end
if (verdict == 'run' or verdict == 'lost') and ARGV[3] == '1' then
  redis.call('HSET', run, skey, ARGV[4])
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[5])
  if status == PENDING then
    redis.call('HSET', run, 'status', RUNNING, 'started_at', ARGV[6])
    status = RUNNING
  end
end
local out = {verdict, status, rec or false}
if #ARGV >= 8 then
  local values = redis.call('HMGET', run, unpack(ARGV, 8))
  for i = 1, #values do
    out[#out + 1] = values[i]
  end
end
return out
