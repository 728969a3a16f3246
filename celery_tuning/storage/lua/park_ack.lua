-- park_ack.lua: the mover published an entry it claimed: drop it, if that claim still owns it.
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  park id   ARGV[4]  the pub the mover claimed it with
-- Returns: 1 when the ticket's pub is still ARGV[4] (entry and claim dropped, ticket kept for
-- ticket TTL to recognise duplicates), else 0 (a later claim owns it, or Redis lost it): no-op.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.ack.
--@include server_clock
--@include park_trim
--@include park_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local id = ARGV[3]
park_trim(KEYS, {now})
local ticket = redis.call('HGET', KEYS[5], id)
if not ticket or tonumber(string.match(ticket, '^%d+')) ~= tonumber(ARGV[4]) then
  return 0
end
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[3], id)
redis.call('ZADD', KEYS[6], string.format('%.0f', now + ttl), id)
park_touch(KEYS, {now, ttl})
return 1
