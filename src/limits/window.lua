-- Sliding-window limits, all or nothing, in one round trip.
-- KEYS[i]  a hash per (tier, subject, action): field = bucket number, value = cost counted
-- ARGV[1]  window (ms)   ARGV[2] bucket (ms)
-- ARGV[1 + 2i] limit of check i   ARGV[2 + 2i] its cost
-- A check passes when what was counted in the current bucket and the window's worth of
-- buckets before it (window + up to one bucket, by Redis' clock) plus its cost fits its
-- limit: so no 1-second span ever holds more than the limit.
-- Returns {1, 0, 0} counted, or {0, retry_after_ms, index of the first failing check}.
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local bucket = tonumber(ARGV[2])
local span = math.floor(window / bucket)
local cur = math.floor(now / bucket)
local oldest = cur - span
local retry, failed = 0, 0
for i = 1, #KEYS do
  local limit = tonumber(ARGV[1 + 2 * i])
  local cost = tonumber(ARGV[2 + 2 * i])
  local flat = redis.call("HGETALL", KEYS[i])
  local used, counts = 0, {}
  for j = 1, #flat, 2 do
    local b, c = tonumber(flat[j]), tonumber(flat[j + 1])
    if b < oldest then
      redis.call("HDEL", KEYS[i], flat[j])
    else
      used = used + c
      counts[#counts + 1] = {b, c}
    end
  end
  if used + cost > limit then
    if failed == 0 then failed = i end
    local wait = window + bucket
    if cost <= limit then
      table.sort(counts, function(x, y) return x[1] < y[1] end)
      local need, freed = used + cost - limit, 0
      for _, bc in ipairs(counts) do
        freed = freed + bc[2]
        if freed >= need then
          wait = (bc[1] + span + 1) * bucket - now
          break
        end
      end
    end
    if wait > retry then retry = wait end
  end
end
if failed > 0 then
  return {0, retry, failed}
end
for i = 1, #KEYS do
  redis.call("HINCRBY", KEYS[i], cur, ARGV[2 + 2 * i])
  redis.call("PEXPIRE", KEYS[i], window + 2 * bucket)
end
return {1, 0, 0}
