-- fair_show.lua: one queue's counts and its deepest keys, read-only (the CLI, metrics).
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME
-- ARGV[2]  the queue's key stem (not read)   ARGV[3]  how many deepest keys to answer (0: none)
-- ARGV[4]  most keys looked at for them (the ring's head first; 0: none)
-- Returns: {waiting, keys waiting, released and not started, claimed, released in total,
-- live consumers' capacity, undeliverable, then digest, depth for the deepest keys, deepest first}.
-- Touches: nothing. Looking for the deepest keys costs one HMGET per key looked at (the CLI only).
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.snapshot.
--@include server_clock
--@include fair_line
local now = server_clock({}, {ARGV[1]})
local nowf = string.format('%.0f', now)
local capacity = 0
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[10], '(' .. nowf, '+inf')) do
  capacity = capacity + (tonumber(redis.call('HGET', KEYS[11], node)) or 0)
end
local out = {
  tonumber(redis.call('HGET', KEYS[12], 'n')) or 0,
  redis.call('LLEN', KEYS[1]),
  redis.call('ZCOUNT', KEYS[5], '(' .. nowf, '+inf'),
  redis.call('ZCARD', KEYS[4]),
  tonumber(redis.call('HGET', KEYS[12], 'r')) or 0,
  capacity,
  redis.call('ZCARD', KEYS[14]),
}
local top = tonumber(ARGV[3])
if top > 0 and tonumber(ARGV[4]) > 0 then
  local best = {}
  for _, d in ipairs(redis.call('LRANGE', KEYS[1], 0, tonumber(ARGV[4]) - 1)) do
    local depth = fair_line(KEYS, {'len', d})
    local i = #best + 1
    while i > 1 and (best[i - 1][2] < depth or (best[i - 1][2] == depth and best[i - 1][1] > d)) do
      i = i - 1
    end
    if i <= top then
      table.insert(best, i, {d, depth})
      if #best > top then
        table.remove(best)
      end
    end
  end
  for _, pair in ipairs(best) do
    out[#out + 1] = pair[1]
    out[#out + 1] = pair[2]
  end
end
return out
