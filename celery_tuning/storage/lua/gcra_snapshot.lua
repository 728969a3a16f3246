-- gcra_snapshot.lua: what a limiter's bucket looks like now, read-only (`celery tuning limit show`).
--
-- KEYS[1]  bucket key ("allow_at full_at", µs)   KEYS[2]  limiter override hash (same hash tag)
-- ARGV[1]  configured interval (µs)    ARGV[2]  configured burst
-- ARGV[3]  now override in µs ('' = TIME)
-- Returns: {interval (µs) and burst in force now (after override and adaptive factor),
--           the adaptive factor now as a '%.17g' string (false: none, or fully recovered),
--           allow_at (µs; false: the bucket is full), now (µs),
--           1 when a run-time override (`tuning limit set`) is in force, else 0}
-- Touches: reads KEYS[1], KEYS[2]; writes nothing (a recovered factor is left for
--          gcra_acquire.lua to forget).
-- Mirrors MemoryGcraStore.snapshot; the token count is celery_tuning.policy.gcra.gcra_tokens.
--@include server_clock
--@include gcra_state
--@include gcra_rate
local now = server_clock({}, {ARGV[3]})
local interval, burst, factor = gcra_rate({KEYS[2]}, {ARGV[1], ARGV[2], now})
local shown = false
if factor and factor < 1 then shown = string.format('%.17g', factor) end
local overridden = 0
if redis.call('HEXISTS', KEYS[2], 'interval') == 1 or redis.call('HEXISTS', KEYS[2], 'burst') == 1 then
  overridden = 1
end
local allow_at = gcra_state({KEYS[1]}, {now}) or false
return {interval, burst, shown, allow_at, now, overridden}
