-- park_redeem.lua: may a worker run a message the mover published?
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  park id   ARGV[4]  the pub in the message's header
-- Returns: 0 for a stale duplicate (the ticket's pub is higher: a later claim republished it);
-- else 1: run it. A missing ticket (trimmed, or Redis lost its state) answers 1 (never lose a
-- task); the same pub redeemed twice (a broker redelivery) answers 1 again. On 1 the ticket
-- becomes "<pub>:r" and the entry is dropped wherever it is (it runs now: no later claim), and
-- from the published set (it arrived).
-- A caller key's spot left with no due, waiting or claimed entry leaves its limit's key index.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.redeem.
--@include server_clock
--@include park_trim
--@include park_touch
--@include park_unindex
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local id = ARGV[3]
local pub = tonumber(ARGV[4])
park_trim(KEYS, {now})
local ticket = redis.call('HGET', KEYS[5], id)
if ticket and tonumber(string.match(ticket, '^%d+')) > pub then
  return 0
end
redis.call('HSET', KEYS[5], id, string.format('%d:r', pub))
redis.call('ZADD', KEYS[6], string.format('%.0f', now + ttl), id)
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[7], id)
redis.call('HDEL', KEYS[3], id)
park_touch(KEYS, {now, ttl})
park_unindex(KEYS, {})
return 1
