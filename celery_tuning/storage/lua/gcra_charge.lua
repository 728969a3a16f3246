-- gcra_charge.lua: debit a bucket after the fact (e.g. the LLM tokens a call used), never waiting
-- and never refusing: `celery_tuning.limiter(name).charge(n, key=None)`.
--
-- KEYS[1]  bucket key ("allow_at full_at", µs)   KEYS[2]  limiter override hash (same hash tag)
-- ARGV[1]  configured interval (µs)    ARGV[2]  configured burst
-- ARGV[3]  n: tokens to debit, integer >= 1 (may be far above the burst: that is debt)
-- ARGV[4]  largest debt (µs): allow_at is never moved past now + this (a year; see MAX_DEBT_US)
-- ARGV[5]  now override in µs ('' = TIME)
-- Returns: the debt now, in µs: how long until a call of cost 1 is admitted again (0 when the
--          bucket still holds a token after the charge).
-- Touches: KEYS[1] (SET with PX: the key lives a second past full_at, so it always outlives the
--          debt); reads KEYS[2] (the rate in force, after override and adaptive factor; a
--          recovered factor is left for gcra_acquire.lua to forget).
-- Units:   microseconds.
-- Mirrors MemoryGcraStore.charge (celery_tuning.storage.gcra.gcra_charge): the same move as an
-- admitted acquire of cost n (allow_at += n intervals from the bucket's level now), without the
-- admission check.
--@include server_clock
--@include gcra_state
--@include gcra_rate
local n = tonumber(ARGV[3])
local max_debt = tonumber(ARGV[4])
local now = server_clock({}, {ARGV[5]})
local interval, burst = gcra_rate({KEYS[2]}, {ARGV[1], ARGV[2], now})

local base = now - (burst - 1) * interval
local held = gcra_state({KEYS[1]}, {now})
if held and held > base then base = held end
local allow_at = base + n * interval
if allow_at > now + max_debt then allow_at = math.max(base, now + max_debt) end
local full_at = allow_at + (burst - 1) * interval
redis.call('SET', KEYS[1], string.format('%.0f %.0f', allow_at, full_at),
           'PX', math.ceil((full_at - now) / 1000) + 1000)
if allow_at > now then return allow_at - now end
return 0
