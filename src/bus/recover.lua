-- A channel's position and, optionally, its history after an offset, atomically.
-- KEYS[1] meta hash  KEYS[2] history stream
-- ARGV[1] epoch to create if the channel has none  ARGV[2] meta ttl (s)
-- ARGV[3] offset to read after, "" = position only
-- ARGV[4] epoch of that offset: entries are read only when it is the current epoch
-- ARGV[5] entries to return at most
-- ARGV[6] "0", or a limit: a reader that missed more than this gets no entries (the
--         recovery cap: all or nothing, and nothing read in vain)
-- Returns {epoch, top offset} or {epoch, top offset, entries}.
local epoch = redis.call("HGET", KEYS[1], "e")
if not epoch then
  -- Create the epoch now so a client that subscribes before the first publication
  -- can recover across it, and a stream that lost its data says so at once.
  epoch = ARGV[1]
  redis.call("HSET", KEYS[1], "e", epoch, "o", 0)
  redis.call("EXPIRE", KEYS[1], ARGV[2])
  redis.call("DEL", KEYS[2])
end
local top = tonumber(redis.call("HGET", KEYS[1], "o") or "0")
if ARGV[3] == "" or ARGV[4] ~= epoch then
  return {epoch, top}
end
local from = tonumber(ARGV[3]) + 1
if from > top then
  return {epoch, top, {}}
end
local limit = tonumber(ARGV[6])
if limit > 0 and top - from + 1 > limit then
  return {epoch, top}
end
return {epoch, top,
  redis.call("XRANGE", KEYS[2], string.format("%.0f-0", from), "+", "COUNT", ARGV[5])}
