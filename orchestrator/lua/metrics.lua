-- Metrics helpers, prepended to the scripts that count (see orchestrator/counters.py for
-- the fields). Counting inside the script that makes the state change keeps a count
-- exact (a duplicate or refused change counts nothing) and costs no round trip.

-- A run ended with `status`: count it, and observe its duration from created_at to
-- finished_at (both in the run hash) in the bucket of the first bound of `bounds`
-- (comma-separated, ascending) that holds it.
local function metrics_run_ended(mkey, run, status, bounds)
  local v = redis.call('HMGET', run, 'flow', 'created_at', 'finished_at')
  local flow = v[1] or ''
  redis.call('HINCRBY', mkey, 'finished|' .. flow .. '|' .. status, 1)
  local created, finished = tonumber(v[2]), tonumber(v[3])
  if not (created and finished) then
    return
  end
  local d = math.max(finished - created, 0)
  local le = '+Inf'
  for b in string.gmatch(bounds, '[^,]+') do
    if d <= tonumber(b) then
      le = b
      break
    end
  end
  redis.call('HINCRBY', mkey, 'run|' .. flow .. '|' .. le, 1)
  redis.call('HINCRBYFLOAT', mkey, 'run_sum|' .. flow, string.format('%.6f', d))
end

-- Apply the increments that ARGV holds from index i: a count n, then n (field,
-- increment) pairs. Returns the index after them.
local function metrics_add(mkey, i)
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    redis.call('HINCRBYFLOAT', mkey, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
  return i
end

