-- lease_renew.lua: extend the leases a process still holds; drop the ones it released.
--
-- KEYS[1]  sorted set of leases (see lease_acquire.lua)
-- ARGV[1]  lease TTL (µs)   ARGV[2..n]  lease ids to extend
-- Returns: how many of them were still held (a lease that expired is gone: its task keeps
--          running, but the slot may have been handed to someone else).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local expires = string.format('%.0f', now + tonumber(ARGV[1]))
local renewed = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expires, ARGV[i])
    renewed = renewed + 1
  end
end
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
return renewed
