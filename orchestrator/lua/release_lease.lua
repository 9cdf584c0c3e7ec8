-- Drop the lease of a step that a worker node no longer runs (it ended, or its process
-- died and Celery gave the message back), so a new delivery need not wait for it to lapse.
-- KEYS: run hash.
-- ARGV: step key, Celery task id, worker node name.
-- Deletes l:<key> only if that node holds it for that task id; returns 1 then, else 0.
local raw = redis.call('HGET', KEYS[1], 'l:' .. ARGV[1])
if not raw then
  return 0
end
local l = cjson.decode(raw)
if l['t'] ~= ARGV[2] or string.sub(l['w'], 1, #ARGV[3] + 1) ~= ARGV[3] .. ':' then
  return 0
end
redis.call('HDEL', KEYS[1], 'l:' .. ARGV[1])
return 1
