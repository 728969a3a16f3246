-- gcra_pause.lua: hold a limiter for every worker (the remote API answered "slow down").
--
-- KEYS[1]  bucket TAT key            KEYS[2]  limiter override hash (same hash tag)
-- ARGV[1]  interval (µs)             ARGV[2]  burst
-- ARGV[3]  pause (µs): nothing is admitted before now + pause
-- ARGV[4]  adaptive decrease: multiply the rate factor by this (e.g. 0.5); '' = not adaptive
-- ARGV[5]  smallest factor (e.g. 0.05)
-- ARGV[6]  recovery per µs (factor units), e.g. 1 / 60e6 recovers fully in a minute
-- ARGV[7]  now override in µs ('' = TIME)
-- Returns: {new TAT (µs), the factor now * 1e6 as an integer, after the decrease (1e6 when the
--          limiter is not slowed)}
-- Touches: KEYS[1] (SET with PX), KEYS[2] (HSET factor, factor_at, recover when adaptive).
-- Units:   microseconds; the factor is stored with 17 significant digits, so a double read back
--          is the double written (the memory store keeps the exact float).
-- Mirrors MemoryGcraStore.pause and celery_tuning.policy.gcra.gcra_pause for the TAT, computed
-- with the interval the limiter has now, after the decrease (gcra_acquire.lua scales it the same
-- way). An adaptive limiter's interval only shrinks while it recovers, so nothing is admitted
-- before now + pause whatever the burst; the first admission comes a little later, by
-- (burst - 1) times what the interval has shrunk by then.
--@include gcra_clock
--@include gcra_rate
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local pause = tonumber(ARGV[3])
local now = gcra_clock({}, {ARGV[7]})

local _, _, factor = gcra_rate({KEYS[2]}, {interval, burst, now})
factor = math.min(factor or 1, 1)
if ARGV[4] ~= '' then
  factor = math.max(tonumber(ARGV[5]), factor * tonumber(ARGV[4]))
  redis.call('HSET', KEYS[2], 'factor', string.format('%.17g', factor),
             'factor_at', string.format('%.0f', now), 'recover', ARGV[6])
end
local slowed_interval, slowed_burst = gcra_rate({KEYS[2]}, {interval, burst, now})

local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local paused = now + pause + (slowed_burst - 1) * slowed_interval
if paused > tat then tat = paused end
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {tat, math.floor(factor * 1000000)}
