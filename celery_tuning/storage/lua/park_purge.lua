-- park_purge.lua: drop every entry of a spot (the CLI's "tuning parked purge").
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV     [1] now, [2] ticket TTL: unused
-- Returns: how many entries were dropped (due + waiting + claimed).
-- Touches: KEYS[1..4] (UNLINK: freed in the background however large). Tickets stay, so a
-- message already published still runs once.
-- A caller key's spot leaves its limit's key index (KEYS[9]).
-- Mirrors celery_tuning.storage.park.MemoryParkStore.purge.
--@include park_unindex
local count = redis.call('ZCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[4])
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
park_unindex(KEYS, {})
return count
