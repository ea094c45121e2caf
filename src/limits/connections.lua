-- Concurrent connections of one subject, as leases in a sorted set (score = expiry, ms).
-- KEYS[1] the set   ARGV[1] limit   ARGV[2] member (node:connection)   ARGV[3] lease (ms)
-- Expired leases (their node died) are dropped first. Returns {1, count} when the member
-- was added, {0, count} when the subject is at its limit.
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
local n = redis.call("ZCARD", KEYS[1])
if n >= tonumber(ARGV[1]) then
  return {0, n}
end
redis.call("ZADD", KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call("PEXPIRE", KEYS[1], 2 * tonumber(ARGV[3]))
return {1, n + 1}
