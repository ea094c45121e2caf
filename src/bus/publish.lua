-- One publication, atomically: fence -> dedupe -> offset/epoch -> history -> PUBLISH.
-- KEYS[1] meta hash {e = epoch, o = last offset}
-- KEYS[2] history stream (entry id = "<offset>-1", field d = data)
-- KEYS[3] dedupe key (KEYS[1] again when unused)
-- KEYS[4] lease key (KEYS[1] again when unused, and always on a Cluster: see ARGV[11])
-- KEYS[5] fence record key (KEYS[1] again when unused, and always on a Cluster)
-- ARGV[1] data  ARGV[2] history size  ARGV[3] history ttl (s)  ARGV[4] meta ttl (s)
-- ARGV[5] epoch to use if the channel has none  ARGV[6] pub/sub channel
-- ARGV[7] dedupe ttl (s), "0" = no dedupe  ARGV[8] lease token, "" = no fence
-- ARGV[9] when it entered the bus (µs since the Unix epoch), for the latency metric
-- ARGV[10] fence record value, "" (or absent) = none: SET into KEYS[5] when published; already there
--          means this publication is on the bus (a retry): {2, 0, ""}
-- ARGV[11] "0" (or absent), or the fence deadline on Redis Cluster (ms since the Unix
--          epoch): the lease lives in another slot, so it was checked just before
--          (bus/cluster.rs) and this publication is accepted only while that check holds
-- ARGV[12] "PUBLISH" (or absent), or "SPUBLISH" (sharded pub/sub) on Redis Cluster
-- On a Cluster every key here shares the channel's hash tag: one slot per script.
-- Returns {1, offset, epoch} published, {2, offset, epoch} duplicate, {0, 0, ""} fenced.
if ARGV[8] ~= "" and redis.call("GET", KEYS[4]) ~= ARGV[8] then
  return {0, 0, ""}
end
if (ARGV[11] or "0") ~= "0" then
  local t = redis.call("TIME")
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= tonumber(ARGV[11]) then
    return {0, 0, ""}
  end
end
if (ARGV[10] or "") ~= "" and redis.call("GET", KEYS[5]) == ARGV[10] then
  return {2, 0, ""}
end
if ARGV[7] ~= "0" then
  local seen = redis.call("GET", KEYS[3])
  if seen then
    return {2, tonumber(seen), redis.call("HGET", KEYS[1], "e") or ""}
  end
end
local epoch = redis.call("HGET", KEYS[1], "e")
if not epoch then
  epoch = ARGV[5]
  redis.call("HSET", KEYS[1], "e", epoch)
  -- A new epoch starts a new stream: entries of a lost epoch must not be replayed.
  redis.call("DEL", KEYS[2])
end
local offset = redis.call("HINCRBY", KEYS[1], "o", 1)
redis.call("EXPIRE", KEYS[1], ARGV[4])
if tonumber(ARGV[2]) > 0 then
  redis.call("XADD", KEYS[2], "MAXLEN", ARGV[2], offset .. "-1", "d", ARGV[1])
  redis.call("EXPIRE", KEYS[2], ARGV[3])
end
if ARGV[7] ~= "0" then
  redis.call("SET", KEYS[3], offset, "EX", ARGV[7])
end
if (ARGV[10] or "") ~= "" then
  redis.call("SET", KEYS[5], ARGV[10])
end
local message = offset .. " " .. epoch .. " t" .. ARGV[9] .. " " .. ARGV[1]
if ARGV[12] == "SPUBLISH" then
  redis.call("SPUBLISH", ARGV[6], message)
else
  redis.call("PUBLISH", ARGV[6], message)
end
return {1, offset, epoch}
