-- cache_renew.lua: extend single-flight locks this process still holds (its leaders are alive).
--
-- KEYS[i]      lock key of the i-th held lock (on a Cluster: every key of one call in one slot)
-- ARGV[2i-1]   the i-th lock's token (the leader's)
-- ARGV[2i]     its new TTL in ms: one lease, or what is left of the leader's lock_timeout
-- Returns: a list, 1 where the lock still held our token and was extended, 0 where it did not
--          (expired in a stall, flushed, released, or taken by a follower since): a lock that is
--          no longer ours is never touched, let alone taken back.
-- Python mirror: celery_tuning.storage.cache_locks.LockRenewer.renew_once.
local renewed = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[2 * i - 1] then
    redis.call('PEXPIRE', key, tonumber(ARGV[2 * i]))
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
return renewed
