-- gcra_rate.lua: a limiter's emission interval and burst at a given time, after its run-time
-- override and its adaptive factor. Not run alone: gcra_acquire.lua and gcra_pause.lua include
-- it ("--@include gcra_rate") so both scale the rate with the same arithmetic.
--
-- KEYS[1]  limiter override hash: interval (µs), burst, factor, factor_at (µs), recover (per µs)
-- ARGV[1]  configured interval (µs)   ARGV[2]  configured burst
-- ARGV[3]  the time (µs) the rate is wanted for
-- Returns: three values: interval (µs), burst, and the adaptive factor at ARGV[3], recovered
--          linearly but not capped at 1 (nil when the limiter has none); the interval is scaled
--          by it while it is below 1.
-- Touches: reads KEYS[1].
-- Mirrors celery_tuning.policy.gcra.recovered_factor and adaptive_interval.
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local at = tonumber(ARGV[3])
local conf = redis.call('HMGET', KEYS[1], 'interval', 'burst', 'factor', 'factor_at', 'recover')
if conf[1] then interval = tonumber(conf[1]) end
if conf[2] then burst = tonumber(conf[2]) end
local factor = nil
if conf[3] then
  -- a clock behind factor_at (another server's, after a failover) counts as no time passed
  local since = math.max(0, at - tonumber(conf[4] or at))
  factor = tonumber(conf[3]) + tonumber(conf[5] or 0) * since
  if factor < 1 then interval = math.floor(interval / factor) end
end
return interval, burst, factor
