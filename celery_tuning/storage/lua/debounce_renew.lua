-- debounce_renew.lua: a worker still runs a debounced run: extend its running mark, re-creating it
-- when Redis lost it.
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  key digest   ARGV[4]  the run's task id   ARGV[5]  lease TTL of the mark (µs)
-- Returns: 1 renewed; 2 re-created (the key had no in-flight run: Redis was flushed, restarted or
-- failed over, or the mark expired and was dropped); 0 another run holds the key (left alone).
-- Touches: the task's keys; expiries extended.
-- Every renewal re-creates, as concurrency leases do: a running run whose mark Redis lost would
-- otherwise let the next pending run start beside it.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.renew.
--@include server_clock
--@include debounce_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local d = ARGV[3]
local id = ARGV[4]
local i = redis.call('HGET', KEYS[2], d .. ':i')
local done = 1
if i and i ~= id then
  return 0
end
local until_ = string.format('%.0f', now + tonumber(ARGV[5]))
if not i then
  done = 2
  redis.call('HSET', KEYS[2], d .. ':i', id, d .. ':n', '0')
end
redis.call('HSET', KEYS[2], d .. ':s', 'r', d .. ':x', until_)
redis.call('HDEL', KEYS[2], d .. ':b')
redis.call('ZADD', KEYS[1], until_, d)
debounce_touch(KEYS, {now, ttl, tonumber(until_)})
return done
