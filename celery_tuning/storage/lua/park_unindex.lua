-- park_unindex.lua: a caller key's spot that holds no parked or claimed entry leaves its limit's
-- key index, so the movers stop visiting it (a million tenants that parked once cost nothing idle).
-- Not run alone: included ("--@include park_unindex") by the scripts that remove entries
-- (park_claim, park_ack, park_redeem, park_purge).
--
-- KEYS     one spot's keys (see park_add.lua); [9] the limit's key index (storage/keys.py
--          park_key_index_key: same hash tag as the spot)
-- ARGV     unused
-- Returns: 1 when the spot's digest left KEYS[9], else 0 (not a caller key's spot, or it still
-- holds due, waiting or claimed entries).
-- Touches: KEYS[9] (SREM; Redis drops the set with its last member). Published ids and standbys do
-- not keep a spot listed: they need no mover, and park_add.lua lists the spot again with its next
-- entry.
-- Mirrors celery_tuning.storage.park.MemoryParkStore._unindex.
--@include park_keyed
local digest = park_keyed(KEYS, ARGV)
if not digest then
  return 0
end
if redis.call('ZCARD', KEYS[1]) > 0 or redis.call('ZCARD', KEYS[2]) > 0 or redis.call('ZCARD', KEYS[4]) > 0 then
  return 0
end
return redis.call('SREM', KEYS[9], digest)
