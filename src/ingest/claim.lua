-- KEYS[1] live nodes, KEYS[2..n+1] shard leases, KEYS[n+2..2n+1] deferral flags.
-- ARGV: instance, ttl ms, claim (1/0), nonce, first shard to try.
local ttl = tonumber(ARGV[2])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1] .. ":"
local shards = (#KEYS - 1) / 2
local out = {0, 0, 0}
-- Deferred by another node: any node may hold it beyond its share.
local function beyond(i)
  local by = redis.call("GET", KEYS[i + shards])
  return by and by ~= ARGV[1]
end
if ARGV[3] ~= "1" then
  redis.call("ZREM", KEYS[1], ARGV[1])
  for i = 2, shards + 1 do
    local v = redis.call("GET", KEYS[i])
    if v and string.sub(v, 1, #prefix) == prefix then redis.call("DEL", KEYS[i]) end
    out[i + 2] = ""
    out[i + 2 + shards] = 0
  end
  return out
end
redis.call("ZADD", KEYS[1], now + ttl, ARGV[1])
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
redis.call("PEXPIRE", KEYS[1], ttl * 4)
local live = redis.call("ZCARD", KEYS[1])
local share = math.ceil(shards / live)
local held = 0
for i = 2, shards + 1 do
  local v = redis.call("GET", KEYS[i])
  if v and string.sub(v, 1, #prefix) == prefix then
    redis.call("PEXPIRE", KEYS[i], ttl)
    held = held + 1
    out[i + 2] = v
  else
    out[i + 2] = ""
  end
end
local first = tonumber(ARGV[5])
for j = 0, shards - 1 do
  local i = ((first + j) % shards) + 2
  if out[i + 2] == "" then
    if held < share or beyond(i) then
      local token = prefix .. ARGV[4] .. ":" .. (i - 2)
      if redis.call("SET", KEYS[i], token, "NX", "PX", ttl) then
        held = held + 1
        out[i + 2] = token
      end
    end
  end
end
-- Every deferred shard we hold counts beyond the share (not only those acquired now):
-- otherwise one acquired earlier would make a later one surplus, handed straight back.
local extra = 0
for i = 2, shards + 1 do
  if out[i + 2] ~= "" and beyond(i) then
    extra = extra + 1
    out[i + 2 + shards] = 1
  else
    out[i + 2 + shards] = 0
  end
end
out[1] = live
out[2] = share
out[3] = extra
return out
