-- debounce_call.lua: a call of a debounced task: start a pending run for its key, or collapse into
-- the one that waits (its payload replaced by this call's, its due time moved).
--
-- KEYS (every debounce_*.lua script receives one task's keys in this order; all share the task's
-- hash tag, storage/debounce.py debounce_keys)
--   [1] due  (zset key digest -> when a mover should look at the key next, µs)
--   [2] runs (hash "<digest>:<field>" -> value; per key: the pending run p (id), m (payload),
--            f (first call, µs), t (due, µs); the in-flight run i (id), b (payload while claimed),
--            s (state: c claimed by a mover, a published, r running), x (expiry of its claim or
--            mark, µs), n (publication number))
--   [3] tix  (hash task id -> ticket "<pub>" or "<pub>:r" when a worker started it)
--   [4] tixat (zset task id -> when its ticket may go, µs)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  key digest   ARGV[4]  id for a new pending run   ARGV[5]  payload (JSON text)
-- ARGV[6]  delay (µs)   ARGV[7]  max_wait (µs), or '' for none
-- ARGV[8]  '1' when ARGV[4] is the caller's own id (it waits for that id): a pending run of another
--          id is then left as it is, and its id answered with 1 (the caller publishes at once)
-- Returns: {id of the pending run, 1 when this call collapsed into it (0: it is new)}.
-- Touches: the task's keys; expiries extended (debounce_touch).
-- Due: min(now + delay, first call + max_wait) (policy/debounce.py due_us). A key with an in-flight
-- run is looked at when that run's claim or mark expires (its end makes the pending run due at
-- once): a pending run is never published while the previous one may still run.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.call.
--@include server_clock
--@include debounce_trim
--@include debounce_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local d = ARGV[3]
debounce_trim(KEYS, {now})
local id = redis.call('HGET', KEYS[2], d .. ':p')
local first = now
local collapsed = 0
if id and ARGV[8] == '1' and id ~= ARGV[4] then
  return {id, 1}
end
if id then
  first = tonumber(redis.call('HGET', KEYS[2], d .. ':f')) or now
  collapsed = 1
else
  id = ARGV[4]
  redis.call('HSET', KEYS[2], d .. ':p', id, d .. ':f', string.format('%.0f', now))
end
local due = now + tonumber(ARGV[6])
if ARGV[7] ~= '' then
  due = math.min(due, first + tonumber(ARGV[7]))
end
redis.call('HSET', KEYS[2], d .. ':m', ARGV[5], d .. ':t', string.format('%.0f', due))
local score = due
local x = tonumber(redis.call('HGET', KEYS[2], d .. ':x'))
if x then
  score = x
end
redis.call('ZADD', KEYS[1], string.format('%.0f', score), d)
debounce_touch(KEYS, {now, ttl, math.max(due, score)})
return {id, collapsed}
