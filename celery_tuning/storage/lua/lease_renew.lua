-- lease_renew.lua: extend the leases a process still holds, putting back any Redis lost.
--
-- KEYS[1]  sorted set of leases (see lease_acquire.lua)
-- ARGV[1]  lease TTL (µs)   ARGV[2]  now in µs, or '' for the server's TIME
-- ARGV[3..n]  ids of leases whose tasks are still running
-- Returns: how many of them were missing and had to be re-created.
-- Touches only KEYS[1]; its expiry (ms) is set past the latest live lease.
-- Mirrors celery_tuning.storage.lease.MemoryLeaseStore.renew.
--
-- Every renewal re-creates: a FLUSHDB, a restart without persistence or a failover to a replica
-- that had not seen the ZADD loses leases whose tasks still run, and a set that forgot them would
-- admit N more. A lease comes back even when that puts the set above N (someone took a slot of
-- the emptied set before this renewal): the tasks really are running, so counting them is what
-- keeps the cap; nobody new is admitted until enough of them end. The cap is exceeded only by
-- callers admitted between the loss and this renewal (at most ttl / 3 later), for as long as
-- those tasks run. A lease that expired because its renewer stalled past the TTL comes back the
-- same way, for the same reason.
--@include server_clock
local now = server_clock({}, {ARGV[2]})
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local expires = string.format('%.0f', now + tonumber(ARGV[1]))
local recreated = 0
for i = 3, #ARGV do
  recreated = recreated + redis.call('ZADD', KEYS[1], expires, ARGV[i])
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
end
return recreated
