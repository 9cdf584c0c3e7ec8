-- Move a run to a new status if it is in one of the expected ones (cancel, fail,
-- resume a retry); appends the event and, for an ending status, sets retention.
-- KEYS: run hash, events stream.
-- ARGV: expected statuses (comma-separated), new status, event JSON, ttl seconds
--       (0 = persist), then run field/value pairs.
-- Returns the previous status when the move happened, or {err} with the current one.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return redis.error_reply('missing')
end
local ok = false
for s in string.gmatch(ARGV[1], '[^,]+') do
  if s == status then ok = true end
end
if not ok then
  return redis.error_reply('status:' .. status)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2])
if #ARGV >= 5 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
end
redis.call('XADD', KEYS[2], '*', 'e', ARGV[3])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
else
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
end
return status
