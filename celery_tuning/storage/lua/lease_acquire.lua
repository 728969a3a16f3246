-- lease_acquire.lua: take one of N cluster-wide slots, as a lease that expires if not renewed.
--
-- KEYS[1]  sorted set of leases, member = lease id, score = expiry (µs), e.g. tuning:cc:{pdf-render}
-- ARGV[1]  cap (N)        ARGV[2]  lease id        ARGV[3]  lease TTL (µs)
-- ARGV[4]  optional now override in µs (absent: the server's TIME)
-- Returns: {1, leases held now} when granted;
--          {0, µs until the earliest lease expires} when all N slots are taken.
-- Expired leases (their worker died without releasing) are dropped first, so capacity comes
-- back within one lease TTL of a SIGKILL.
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local held = redis.call('ZCARD', KEYS[1])
if held < tonumber(ARGV[1]) then
  local expires = now + tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], string.format('%.0f', expires), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[3]) / 1000) + 1000)
  return {1, held + 1}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, math.max(0, tonumber(first[2]) - now)}
