-- cache_lookup_acquire.lua: cache_lookup.lua and, only when this caller is elected to compute
-- the value, gcra_acquire.lua, in one round trip. This is the miss path of a task that is both
-- cached and rate-limited: it spends a token exactly when the separate calls would.
--
-- KEYS[1..2]  cache_lookup's KEYS: value key, single-flight lock key
-- KEYS[3..4]  gcra_acquire's KEYS: bucket TAT key, limiter override hash
-- ARGV[1..2]  cache_lookup's ARGV: lock token, lock TTL in ms
-- ARGV[3]     gcra_acquire's ARGV[1]: "interval burst cost reserve"
-- ARGV[4]     optional: gcra_acquire's ARGV[2], a fixed clock in µs (tests)
-- Returns: cache_lookup's {value or false, pttl, role}, then gcra_acquire's reply when role is 1
--          (this caller holds the lock), else false: a found value or another caller's
--          computation takes no token.
-- The two key groups carry different hash tags, so this runs on standalone Redis and Sentinel
-- only; on a Cluster the two scripts stay two round trips.
-- The lines "--@include NAME" are replaced by NAME.lua as a local function of (KEYS, ARGV).
--@include cache_lookup
--@include gcra_acquire
local found = cache_lookup({KEYS[1], KEYS[2]}, {ARGV[1], ARGV[2]})
if found[3] ~= 1 then
  return {found[1], found[2], found[3], false}
end
return {found[1], found[2], found[3], gcra_acquire({KEYS[3], KEYS[4]}, {ARGV[3], ARGV[4]})}
