-- park_promote.lua: concurrency waiters become due as slots free up (and the release of a lease).
--
-- KEYS     one spot's keys (see park_add.lua, [1..9]), then [10] the limit's lease set (same hash tag)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  cap   ARGV[4]  most waiters moved in this call (1 on a release)
-- ARGV[5]  a lease id to remove first (the step's release), or ''
-- ARGV[6]  a channel to PUBLISH ARGV[7] (the spot's index member) on when a waiter moved, or ''
-- ARGV[8]  standby slots: how many woken waiters may hold on for the next slot (0 or 1)
-- ARGV[9]  a channel to PUBLISH ARGV[7] on when a lease was removed and a standby holds on, or ''
-- Returns: how many FIFO heads moved to due (score now).
-- Free slots = cap + standby slots - live leases (expiry after now) - entries of the spot
-- already due, claimed or published and not yet arrived (their expiry after now: they are on
-- their way to take a slot) - live standbys. So it never moves more than cap + standby slots -
-- live; the cap itself is the leases' to enforce (a waiter that finds no slot parks again).
-- Touches: the spot's keys (expired published ids dropped) and KEYS[10] (ZREM only); expiries
-- refreshed when anything moved, or when waiters stay and the keys' expiry fell under half the
-- ticket TTL.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.promote / release_lease.
--@include server_clock
--@include park_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local nowf = string.format('%.0f', now)
if ARGV[5] ~= '' then
  redis.call('ZREM', KEYS[10], ARGV[5])
  if ARGV[9] ~= '' and redis.call('ZCOUNT', KEYS[8], '(' .. nowf, '+inf') > 0 then
    redis.call('PUBLISH', ARGV[9], ARGV[7])
  end
end
local waiting = redis.call('ZCARD', KEYS[2])
if waiting == 0 then
  return 0
end
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', nowf)
local live = redis.call('ZCOUNT', KEYS[10], '(' .. nowf, '+inf')
local free = tonumber(ARGV[3]) + tonumber(ARGV[8]) - live - redis.call('ZCARD', KEYS[1])
  - redis.call('ZCARD', KEYS[4]) - redis.call('ZCARD', KEYS[7]) - redis.call('ZCOUNT', KEYS[8], '(' .. nowf, '+inf')
local n = math.min(free, waiting, tonumber(ARGV[4]))
if n <= 0 then
  if redis.call('PTTL', KEYS[2]) < ttl / 2000 then
    park_touch(KEYS, {now, ttl})
  end
  return 0
end
local heads = redis.call('ZRANGE', KEYS[2], 0, n - 1)
for _, id in ipairs(heads) do
  redis.call('ZREM', KEYS[2], id)
  redis.call('ZADD', KEYS[1], nowf, id)
end
park_touch(KEYS, {now, ttl})
if ARGV[6] and ARGV[6] ~= '' then
  redis.call('PUBLISH', ARGV[6], ARGV[7])
end
return n
