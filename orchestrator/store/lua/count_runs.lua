-- Count runs by flow and status, for the /metrics gauges: one page of the active index
-- per call, so Redis is never held long and only the counts travel back.
-- KEYS: run hashes. Returns a flat list of '<flow>|<status>', count; a run whose hash
-- has expired or lacks either field is left out.
local counts = {}
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'flow', 'status')
  if v[1] and v[2] then
    local k = v[1] .. '|' .. v[2]
    counts[k] = (counts[k] or 0) + 1
  end
end
local out = {}
for k, n in pairs(counts) do
  out[#out + 1] = k
  out[#out + 1] = n
end
return out
