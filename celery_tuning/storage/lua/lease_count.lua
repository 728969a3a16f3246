-- lease_count.lua: how many leases are live (their expiry is after now).
--
-- KEYS[1]  sorted set of leases (see lease_acquire.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME
-- Returns: the number of live leases (expired ones are not counted, nor removed: read-only).
-- Mirrors celery_tuning.storage.lease.MemoryLeaseStore.count.
--@include server_clock
local now = server_clock({}, {ARGV[1]})
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.0f', now), '+inf')
