-- park_release.lua: everything of a spot due now (the CLI's "tuning parked release").
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  most entries moved in this call (the caller repeats until fewer moved)
-- Returns: how many entries moved: due later -> due now, then FIFO waiters -> due now.
-- Touches: the spot's keys; expiries refreshed when anything moved.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.release.
--@include server_clock
--@include park_touch
local now = server_clock({}, {ARGV[1]})
local nowf = string.format('%.0f', now)
local most = tonumber(ARGV[3])
local later = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. nowf, '+inf', 'LIMIT', 0, most)
for _, id in ipairs(later) do
  redis.call('ZADD', KEYS[1], nowf, id)
end
local heads = {}
if most - #later > 0 then
  heads = redis.call('ZRANGE', KEYS[2], 0, most - #later - 1)
  for _, id in ipairs(heads) do
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[1], nowf, id)
  end
end
local moved = #later + #heads
if moved > 0 then
  park_touch(KEYS, {now, tonumber(ARGV[2])})
end
return moved
