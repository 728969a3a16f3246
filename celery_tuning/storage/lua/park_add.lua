-- park_add.lua: park one entry, due at a time or as a FIFO waiter; re-parking replaces it.
--
-- KEYS (every park_*.lua script receives one spot's keys in this order; storage/keys.py park_keys)
--   [1] due (zset id -> due µs)        [2] wait (zset id -> first-park sequence µs)
--   [3] msg (hash id -> payload)       [4] claim (zset id -> claim expiry µs)
--   [5] tix (hash id -> "<pub>" or "<pub>:r")   [6] tixat (zset id -> when the ticket may go, µs)
--   [7] pub (zset id -> expiry µs: published by a mover, not arrived yet; concurrency spots)
--   [8] standby (zset token -> expiry µs: woken waiters holding on for the next slot)
--   (storage/keys.py park_handover_keys: [7] and [8]; park_touch refreshes [1..7], never [8])
--   [9] the limit's key index (storage/keys.py park_key_index_key; written at a caller key's
--       spot only: park_add adds the key's digest, park_unindex removes it with its last entry)
--   [10] optional: the index set (single server only; on a Cluster park_index.lua runs first)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  delay in µs, or '' for a FIFO waiter         ARGV[4]  waiter's sequence (µs) or '' (now)
-- ARGV[5]  park id   ARGV[6]  payload   ARGV[7]  the spot's index member
-- Returns: 1, or 0 when the id's ticket is redeemed: that message already ran (a broker
-- redelivered the original after its worker parked it and died before acking), so nothing parks.
-- Touches: the spot's keys (and the index); every key's expiry refreshed (park_touch). At a caller
-- key's spot, the key's digest joins its limit's key index (KEYS[9]) once the entry is parked.
-- A ticket the id already has gets pub + 1: anything published under the old pub is now a stale
-- duplicate, and a mover still acking the old pub cannot remove the new entry.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.park.
--@include server_clock
--@include park_trim
--@include park_touch
--@include park_index
--@include park_keyed
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local id = ARGV[5]
local delay = 0
if ARGV[3] ~= '' then
  delay = math.max(0, tonumber(ARGV[3]))
end
-- The index first, as on a Cluster (where park_index.lua runs before this script): a hint only.
if KEYS[10] then
  park_index({KEYS[10]}, {'', delay + ttl, ARGV[7]})
end
local held = redis.call('HGET', KEYS[5], id)
if held and string.find(held, ':r', 1, true) then
  return 0
end
park_trim(KEYS, {now})
redis.call('ZREM', KEYS[1], id)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', KEYS[4], id)
if ARGV[3] == '' then
  local seq = now
  if ARGV[4] ~= '' then
    seq = tonumber(ARGV[4])
  end
  redis.call('ZADD', KEYS[2], string.format('%.0f', seq), id)
else
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + delay), id)
end
redis.call('HSET', KEYS[3], id, ARGV[6])
local ticket = redis.call('HGET', KEYS[5], id)
if ticket then
  redis.call('HSET', KEYS[5], id, string.format('%d', tonumber(string.match(ticket, '^%d+')) + 1))
  redis.call('ZADD', KEYS[6], string.format('%.0f', now + ttl), id)
end
local digest = park_keyed(KEYS, {})
if digest then
  redis.call('SADD', KEYS[9], digest)
end
park_touch(KEYS, {now, ttl})
return 1
