-- debounce_end.lua: a debounced run ended: clear its running mark, so the key's pending run (a call
-- that came while it ran) is due at its own due time, at once if that has passed.
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  key digest   ARGV[4]  the run's task id
-- Returns: 1 when the run held the key's mark (cleared), else 0: no-op.
-- Touches: the task's keys.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.end.
--@include server_clock
--@include debounce_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local d = ARGV[3]
if redis.call('HGET', KEYS[2], d .. ':i') ~= ARGV[4] then
  return 0
end
redis.call('HDEL', KEYS[2], d .. ':i', d .. ':b', d .. ':s', d .. ':x', d .. ':n')
local t = redis.call('HGET', KEYS[2], d .. ':t')
if t then
  redis.call('ZADD', KEYS[1], t, d)
  debounce_touch(KEYS, {now, ttl, tonumber(t)})
else
  redis.call('ZREM', KEYS[1], d)
end
return 1
