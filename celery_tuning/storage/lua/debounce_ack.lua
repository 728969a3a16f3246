-- debounce_ack.lua: the mover published a debounced run it claimed: it is on its way to a worker.
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  key digest   ARGV[4]  the run's task id   ARGV[5]  the pub the mover claimed it with
-- ARGV[6]  how long the published run holds the key before a worker starts it (µs)
-- Returns: 1 when that claim still owned the run (it is now 'published': its payload is dropped and
-- the key stays held until ARGV[6] from now, or a worker's mark, or its end), else 0: no-op (a later
-- claim owns it, a worker already started it, it ended, or Redis lost it).
-- Touches: the task's keys; expiries extended.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.ack.
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
redis.call('HSET', KEYS[2], d .. ':s', 'a', d .. ':x', string.format('%.0f', x))
redis.call('HDEL', KEYS[2], d .. ':b')
redis.call('ZADD', KEYS[1], string.format('%.0f', x), d)
debounce_touch(KEYS, {now, ttl, x})
return 1
