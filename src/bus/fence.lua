-- The first step of a fenced publication on Redis Cluster (the lease and the channel live in
-- different slots; see bus/cluster.rs for why two steps stay safe).
-- KEYS[1] lease key  ARGV[1] the caller's lease token
-- Returns -1 when the lease is not held by the token, else when it expires: ms since the
-- Unix epoch by this server's clock.
if redis.call("GET", KEYS[1]) ~= ARGV[1] then
  return -1
end
local pttl = redis.call("PTTL", KEYS[1])
if pttl < 0 then
  return -1
end
local t = redis.call("TIME")
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + pttl
