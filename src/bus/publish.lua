-- Publications in order, each one as before in its own right: fence -> dedupe ->
-- offset/epoch -> history -> PUBLISH. One publication is a batch of one. The batch stops at
-- the first fenced publication (those after it are not applied and get no answer); an error
-- aborts the script (what came before it is applied: a retry of the same batch skips it, by
-- the dedupe keys and the fence records, see below).
-- ARGV[1] meta ttl (s)  ARGV[2] dedupe ttl (s)  ARGV[3] "PUBLISH", or "SPUBLISH" (sharded
-- pub/sub) on Redis Cluster  ARGV[4] epoch to use for a channel that has none
-- Publication i (from 0) has KEYS[5i+1 .. 5i+5] and ARGV[4+9i+1 .. 4+9i+9]:
-- KEYS  meta hash {e = epoch, o = last offset}; history stream (entry id "<offset>-1",
--       field d = data); dedupe key; lease key; fence record key (each unused one is the meta
--       key again; lease and record always are on a Cluster: see the deadline)
-- ARGV  data; history size; history ttl (s); pub/sub channel; "1" dedupe or "0"; lease token
--       or "" (no fence); when it entered the bus (µs since the Unix epoch, for the latency
--       metric); fence record value or "" (none): SET into the record key when published;
--       "0", or the fence deadline on Redis Cluster (ms since the Unix epoch): the lease lives
--       in another slot, so it was checked just before (bus/cluster.rs) and the publication
--       is accepted only while that check holds
-- A publication whose record value is already stored is on the bus (a retry): a duplicate.
-- So is one whose record key holds the value of a later publication of this batch: the
-- records of one key are written in order, so a retried batch skips what it published.
-- On a Cluster every key of one call shares a slot (the caller groups by slot).
-- Returns {status, offset, epoch} per answered publication, flattened: 1 published,
-- 2 duplicate ({2, offset, epoch} by dedupe key, {2, 0, ""} by record), 0 fenced (the last).
local n = (#ARGV - 4) / 9
local recorded, through = {}, {}
for i = 0, n - 1 do
  local key, value = KEYS[5 * i + 5], ARGV[4 + 9 * i + 8]
  if value ~= "" then
    if recorded[key] == nil then
      recorded[key] = redis.call("GET", key) or false
    end
    if recorded[key] == value then
      through[key] = i
    end
  end
end
-- Within one call the lease, a channel's epoch and the TTLs cannot change: each is read or
-- set once per key (the script runs atomically, at one instant).
local out, held, epochs, touched = {}, {}, {}, {}
local function fenced()
  table.insert(out, 0); table.insert(out, 0); table.insert(out, "")
  return out
end
local function expire(key, ttl)
  if not touched[key] then
    touched[key] = true
    redis.call("EXPIRE", key, ttl)
  end
end
for i = 0, n - 1 do
  local k, a = 5 * i, 4 + 9 * i
  local meta, history, dedupe, lease, record = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local data, size, ttl, pubsub, deduped, token, at, value, deadline =
    ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9]
  if token ~= "" then
    local fence = lease .. "\n" .. token
    if held[fence] == nil then
      held[fence] = redis.call("GET", lease) == token
    end
    if not held[fence] then
      return fenced()
    end
  end
  if deadline ~= "0" then
    local t = redis.call("TIME")
    if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= tonumber(deadline) then
      return fenced()
    end
  end
  local status, offset, epoch = 0, 0, ""
  if value ~= "" and through[record] ~= nil and i <= through[record] then
    status = 2
  elseif deduped == "1" then
    local seen = redis.call("GET", dedupe)
    if seen then
      status, offset = 2, tonumber(seen)
      epoch = epochs[meta] or redis.call("HGET", meta, "e") or ""
    end
  end
  if status == 0 then
    epoch = epochs[meta] or redis.call("HGET", meta, "e")
    if not epoch then
      epoch = ARGV[4]
      redis.call("HSET", meta, "e", epoch)
      -- A new epoch starts a new stream: entries of a lost epoch must not be replayed.
      redis.call("DEL", history)
    end
    epochs[meta] = epoch
    offset = redis.call("HINCRBY", meta, "o", 1)
    expire(meta, ARGV[1])
    if tonumber(size) > 0 then
      redis.call("XADD", history, "MAXLEN", size, offset .. "-1", "d", data)
      expire(history, ttl)
    end
    if deduped == "1" then
      redis.call("SET", dedupe, offset, "EX", ARGV[2])
    end
    if value ~= "" then
      redis.call("SET", record, value)
    end
    local message = offset .. " " .. epoch .. " t" .. at .. " " .. data
    if ARGV[3] == "SPUBLISH" then
      redis.call("SPUBLISH", pubsub, message)
    else
      redis.call("PUBLISH", pubsub, message)
    end
    status = 1
  end
  table.insert(out, status); table.insert(out, offset); table.insert(out, epoch)
end
return out
