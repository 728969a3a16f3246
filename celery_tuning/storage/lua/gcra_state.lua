-- gcra_state.lua: a bucket's allow_at, for the GCRA scripts. Not run alone: included
-- ("--@include gcra_state") as a local function, so every GCRA script reads a bucket one way.
--
-- KEYS[1]  bucket key (string "allow_at full_at", integer µs; see celery_tuning.policy.gcra)
-- ARGV[1]  now in µs
-- Returns: allow_at (µs), the earliest time a request of cost 1 is admitted; nil when the key
--          is absent, the bucket is full again (full_at <= now) or the value is foreign.
--          A lone integer is a TAT written before allow_at existed: read as allow_at and
--          full_at both, which errs towards waiting, for at most one refill.
-- Touches: reads KEYS[1].
-- Mirrors celery_tuning.policy.gcra._live.
local raw = redis.call('GET', KEYS[1])
if not raw then return nil end
local allow_at, full_at = string.match(raw, '^(%-?%d+) (%-?%d+)$')
if allow_at == nil then
  allow_at = string.match(raw, '^%-?%d+$')
  full_at = allow_at
end
if allow_at == nil or tonumber(full_at) <= tonumber(ARGV[1]) then return nil end
return tonumber(allow_at)
