-- A new epoch for a channel whose stream lost publications that nodes had delivered (Redis
-- lost acknowledged writes: a failover to a replica that had not received them, or a
-- restart from older data; the next publications would reuse their offsets). Only while the
-- epoch is still the one the loss was found in, so of all the nodes that find it, one resets
-- the stream and the others see the new epoch. Same convention as publish.lua for a channel
-- without an epoch: offset 0, history dropped.
-- KEYS[1] meta hash  KEYS[2] history stream
-- ARGV[1] the epoch the loss was found in  ARGV[2] the new epoch  ARGV[3] meta ttl (s)
-- Returns {1, new epoch} reset, or {0, current epoch or ""} left alone.
local epoch = redis.call("HGET", KEYS[1], "e")
if epoch ~= ARGV[1] then
  return {0, epoch or ""}
end
redis.call("HSET", KEYS[1], "e", ARGV[2], "o", 0)
redis.call("EXPIRE", KEYS[1], ARGV[3])
redis.call("DEL", KEYS[2])
return {1, ARGV[2]}
