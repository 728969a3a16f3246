-- park_unclaim.lua: a mover gives back an entry it claimed but must not publish (its task is not
-- registered in the mover's app: another app shares the tuning Redis and the spot's name).
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  park id   ARGV[4]  the pub the mover claimed it with
-- ARGV[5]  µs from now when it is due again (behind this mover's own entries, for another app's)
-- Returns: 1 when that claim still owned it (due again at now + ARGV[5]), else 0.
-- Touches: the spot's keys; expiries refreshed when it moved.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.unclaim.
--@include server_clock
--@include park_touch
local now = server_clock({}, {ARGV[1]})
local id = ARGV[3]
local ticket = redis.call('HGET', KEYS[5], id)
if not ticket or tonumber(string.match(ticket, '^%d+')) ~= tonumber(ARGV[4]) then
  return 0
end
if redis.call('ZREM', KEYS[4], id) == 0 then
  return 0
end
redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[5])), id)
park_touch(KEYS, {now, tonumber(ARGV[2])})
return 1
