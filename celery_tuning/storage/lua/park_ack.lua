-- park_ack.lua: the mover published an entry it claimed: drop it, if that claim still owns it.
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  park id   ARGV[4]  the pub the mover claimed it with
-- ARGV[5]  '1' at a concurrency spot (record the published id), else ''
-- Returns: 1 when the ticket's pub is still ARGV[4] (entry and claim dropped, ticket kept for
-- ticket TTL to recognise duplicates), else 0 (a later claim owns it, or Redis lost it): no-op.
-- At a concurrency spot, a claimed entry's id moves to the published set (KEYS[7]) with its claim's expiry: on its way
-- to a worker, it still counts against a concurrency limit's free slots until the worker redeems
-- it (park_redeem.lua) or that expiry passes (park_promote.lua).
-- A caller key's spot left with no due, waiting or claimed entry leaves its limit's key index.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.ack.
--@include server_clock
--@include park_trim
--@include park_touch
--@include park_unindex
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local id = ARGV[3]
park_trim(KEYS, {now})
local ticket = redis.call('HGET', KEYS[5], id)
if not ticket or tonumber(string.match(ticket, '^%d+')) ~= tonumber(ARGV[4]) then
  return 0
end
local until_ = redis.call('ZSCORE', KEYS[4], id)
if until_ and ARGV[5] == '1' then
  redis.call('ZADD', KEYS[7], until_, id)
end
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[1], id)
redis.call('HDEL', KEYS[3], id)
redis.call('ZADD', KEYS[6], string.format('%.0f', now + ttl), id)
park_touch(KEYS, {now, ttl})
park_unindex(KEYS, {})
return 1
