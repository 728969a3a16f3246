-- lease_acquire.lua: take one of N cluster-wide slots, as a lease that expires if not renewed.
--
-- KEYS[1]  sorted set of leases, member = lease id, score = expiry (µs), e.g. tuning:cc:{pdf-render}
-- ARGV[1]  cap (N)        ARGV[2]  lease id        ARGV[3]  lease TTL (µs)
-- ARGV[4]  now in µs, or '' (or absent) for the server's TIME
-- Returns: {1, leases held now} when granted;
--          {0, µs until enough leases expire for a slot to free up} when all N slots are taken.
-- Touches only KEYS[1]; its expiry (ms) is kept past the latest live lease, so a short lease
-- never cuts a long one's life short.
-- Mirrors celery_tuning.storage.lease.MemoryLeaseStore.acquire (one contract suite runs both).
--
-- Expired leases (their worker died without releasing) are dropped first, so capacity comes
-- back within one lease TTL of a SIGKILL. The set may hold more than N live leases after a
-- renewal re-created leases Redis had lost (lease_renew.lua): then a slot frees up only once
-- (held - N + 1) of them have expired, the (held - N)-th earliest expiry.
--@include server_clock
local now = server_clock({}, {ARGV[4]})
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local held = redis.call('ZCARD', KEYS[1])
local cap = tonumber(ARGV[1])
if held < cap then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[3])), ARGV[2])
  local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
  return {1, held + 1}
end
if held == 0 then
  return {0, 0}
end
local index = math.min(math.max(held - cap, 0), held - 1)
local nth = redis.call('ZRANGE', KEYS[1], index, index, 'WITHSCORES')
return {0, math.max(0, tonumber(nth[2]) - now)}
