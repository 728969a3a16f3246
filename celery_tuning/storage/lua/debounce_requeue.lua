-- debounce_requeue.lua: a debounced run was published again under its own id (Task.retry, a
-- deferral, a park): it keeps its key, as published and not started, until its next attempt starts.
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  key digest   ARGV[4]  the run's task id
-- ARGV[5]  how long the run, queued again, holds the key before an attempt starts (µs)
-- Returns: 1 when the run held the key (its state is now 'a' until ARGV[5] from now), else 0: no-op
-- (another run holds the key, or Redis lost it: the key is free, as when a mark expires).
-- Touches: the task's keys; expiries extended.
-- The next attempt's start (same id) makes it running again; its end frees the key. Without this
-- the attempt's end would free the key and the next pending run could start before the retry.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.requeue.
--@include server_clock
--@include debounce_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local d = ARGV[3]
if redis.call('HGET', KEYS[2], d .. ':i') ~= ARGV[4] then
  return 0
end
local x = now + tonumber(ARGV[5])
redis.call('HSET', KEYS[2], d .. ':s', 'a', d .. ':x', string.format('%.0f', x))
redis.call('HDEL', KEYS[2], d .. ':b')
redis.call('ZADD', KEYS[1], string.format('%.0f', x), d)
debounce_touch(KEYS, {now, ttl, x})
return 1
