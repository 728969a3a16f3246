-- debounce_unclaim.lua: a mover gives back a run it claimed without publishing it (the run's task
-- belongs to another app sharing the tuning Redis): its claim expires soon, then any mover claims
-- it again (with pub + 1), as when a mover dies.
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  key digest   ARGV[4]  the run's task id   ARGV[5]  the pub it was claimed with
-- ARGV[6]  how soon the claim expires (µs)
-- Returns: 1 when that claim still owned the run, else 0: no-op.
-- Touches: the task's keys; expiries extended.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.unclaim.
--@include server_clock
--@include debounce_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local d = ARGV[3]
local f = redis.call('HMGET', KEYS[2], d .. ':i', d .. ':s', d .. ':n')
if f[1] ~= ARGV[4] or f[2] ~= 'c' or tonumber(f[3]) ~= tonumber(ARGV[5]) then
  return 0
end
local x = now + tonumber(ARGV[6])
redis.call('HSET', KEYS[2], d .. ':x', string.format('%.0f', x))
redis.call('ZADD', KEYS[1], string.format('%.0f', x), d)
debounce_touch(KEYS, {now, ttl, x})
return 1
