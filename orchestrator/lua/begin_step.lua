-- Read what a step needs and, when asked, mark it running: one round trip per step start.
-- KEYS: run hash, events stream.
-- ARGV: step key, Celery task id, mark ('1'|'0'), running record JSON, event JSON, now,
--       recovery ('1' for compensation and onFailure steps), then the run-hash fields
--       to read (inputs, s:<ref>, o:<ref>, ...).
-- Returns {verdict, run status, step record, value...} where verdict is
--   run      the caller executes the step (marked running when mark = '1');
--   done     the step already ended (a redelivered message): do not run it again;
--   busy     another message (another task id) is running it now;
--   held     this message again while the delivery running the step holds a live lease
--            (l:<step>, renewed by its worker's heartbeat: orchestrator/recovery.py);
--   inactive the run is not active (cancelled, failed, ...), or is recovering from a
--            failure and this is not a recovery step; missing: no such run.
local run = KEYS[1]
local status = redis.call('HGET', run, 'status')
if not status then
  return {'missing', false, false}
end
if status ~= 'running' and status ~= 'pending' and status ~= 'waiting' then
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
  if s == 'succeeded' or s == 'skipped' or s == 'failed' or s == 'cancelled'
      or s == 'compensated' then
    verdict = 'done'
  elseif s == 'running' and r['task_id'] ~= ARGV[2] then
    return {'busy', status, rec}
  elseif s == 'running' then
    local lease = redis.call('HGET', run, 'l:' .. ARGV[1])
    if lease then
      local l = cjson.decode(lease)
      local now = redis.call('TIME')  -- Redis' clock, as in renew_lease.lua: no skew
      if l['t'] == r['task_id'] and l['w'] == r['worker']
          and l['u'] > now[1] + now[2] / 1e6 then
        return {'held', status, rec}
      end
    end
  end
end
if verdict == 'run' and ARGV[3] == '1' then
  redis.call('HSET', run, skey, ARGV[4])
  redis.call('XADD', KEYS[2], '*', 'e', ARGV[5])
  if status == 'pending' then
    redis.call('HSET', run, 'status', 'running', 'started_at', ARGV[6])
    status = 'running'
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
