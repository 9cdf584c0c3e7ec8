-- Record a decision on a waiting approval step; the first decision wins.
-- KEYS: run hash, events stream. ARGV: step key, who, decision JSON, event JSON.
-- Returns {'ok'}, {'forbidden', approvers JSON}, {'decided'} (already decided),
-- {'not_waiting'}, or {'inactive', status}.
-- Status names (ACTIVE, TERMINAL_STEP, RUNNING, ...) come from orchestrator/status.py.
local run = KEYS[1]
local status = redis.call('HGET', run, 'status')
if not ACTIVE[status] then
  return {'inactive', status or 'missing'}
end
local raw = redis.call('HGET', run, 'w:' .. ARGV[1])
if not raw then
  return {'not_waiting'}
end
local wait = cjson.decode(raw)
if wait['kind'] ~= 'approval' then
  return {'not_waiting'}
end
local approvers = wait['approvers'] or {}
if #approvers > 0 then
  local allowed = false
  for _, a in ipairs(approvers) do
    if a == ARGV[2] then allowed = true end
  end
  if not allowed then
    return {'forbidden', cjson.encode(approvers)}
  end
end
if redis.call('HSETNX', run, 'd:' .. ARGV[1], ARGV[3]) == 0 then
  return {'decided'}
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[4])
return {'ok'}
