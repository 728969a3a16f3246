-- debounce_start.lua: a worker is about to run a debounced run a mover published: may it, and does
-- it hold the key's running mark?
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  key digest   ARGV[4]  the run's task id   ARGV[5]  the pub in the message's header
-- ARGV[6]  lease TTL of the running mark (µs)
-- Returns: 0 for a stale duplicate (the ticket's pub is higher: a later claim published the run
-- again after a mover died between publishing and acknowledging): drop it. 1: run it, holding the
-- key's mark until now + lease TTL (renewed by the worker, cleared at its end). 2: run it without
-- the mark (another run holds the key: a broker redelivery or retry of an older run).
-- A missing ticket (trimmed, or Redis lost its state) answers 1 or 2 (never lose a run); the same
-- pub again (a redelivery) too. The ticket becomes "<pub>:r".
-- Touches: the task's keys; expiries extended.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.start.
--@include server_clock
--@include debounce_trim
--@include debounce_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local d = ARGV[3]
local id = ARGV[4]
local pub = tonumber(ARGV[5])
debounce_trim(KEYS, {now})
local ticket = redis.call('HGET', KEYS[3], id)
if ticket and tonumber(string.match(ticket, '^%d+')) > pub then
  return 0
end
redis.call('HSET', KEYS[3], id, string.format('%d:r', pub))
redis.call('ZADD', KEYS[4], string.format('%.0f', now + ttl), id)
local f = redis.call('HMGET', KEYS[2], d .. ':i', d .. ':s', d .. ':x')
local i, s, x = f[1], f[2], tonumber(f[3])
-- Another run's live mark, or another run's claim (expired or not: its payload waits to be
-- published again), is never overwritten.
if i and i ~= id and ((x and x > now) or s == 'c') then
  debounce_touch(KEYS, {now, ttl, now})
  return 2
end
local until_ = now + tonumber(ARGV[6])
redis.call('HSET', KEYS[2], d .. ':i', id, d .. ':s', 'r', d .. ':x', string.format('%.0f', until_),
           d .. ':n', string.format('%d', pub))
redis.call('HDEL', KEYS[2], d .. ':b')
redis.call('ZADD', KEYS[1], string.format('%.0f', until_), d)
debounce_touch(KEYS, {now, ttl, until_})
return 1
