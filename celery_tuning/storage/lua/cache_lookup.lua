-- cache_lookup.lua: read a cached value, or elect this caller as the one that computes it.
--
-- KEYS[1]  value key, e.g. tuning:cache:{proj.tasks.embed}:v1:g0:<sha256>
-- KEYS[2]  single-flight lock key for the same entry (same hash tag)
-- ARGV[1]  lock token (unique per caller)
-- ARGV[2]  lock TTL in ms (0: only read, never take the lock)
-- Returns: {value or false, pttl of the value in ms (-1: none), role}
--          role: 1 this caller holds the lock (leader), 0 someone else computes it (follower),
--                -1 value found (or read-only lookup).
local value = redis.call('GET', KEYS[1])
if value then
  return {value, redis.call('PTTL', KEYS[1]), -1}
end
local lock_ms = tonumber(ARGV[2])
if lock_ms <= 0 then
  return {false, -1, -1}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', lock_ms) then
  return {false, -1, 1}
end
return {false, -1, 0}
