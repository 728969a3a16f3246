-- gcra_pause.lua: hold a limiter for every worker (the remote API answered "slow down").
--
-- KEYS[1]  bucket key ("allow_at full_at", µs)   KEYS[2]  limiter override hash (same hash tag)
-- ARGV[1]  interval (µs)             ARGV[2]  burst
-- ARGV[3]  pause (µs): nothing is admitted before now + pause, one request exactly then
-- ARGV[4]  adaptive decrease: multiply the rate factor by this (e.g. 0.5); '' = not adaptive
-- ARGV[5]  smallest factor (e.g. 0.05)
-- ARGV[6]  recovery per µs (factor units), e.g. 1 / 60e6 recovers fully in a minute
-- ARGV[7]  now override in µs ('' = TIME)
-- Returns: {new allow_at (µs), the factor now * 1e6 as an integer, after the decrease (1e6 when
--          the limiter is not slowed)}
-- Touches: KEYS[1] (SET with PX), KEYS[2] (HSET factor, factor_at, recover when adaptive).
-- Units:   microseconds; the factor is stored with 17 significant digits, so a double read back
--          is the double written (the memory store keeps the exact float).
-- Mirrors MemoryGcraStore.pause and celery_tuning.policy.gcra.gcra_pause. The pause is kept as
-- an instant (allow_at), not as intervals of the slowed rate, so it ends exactly on time however
-- much the interval shrinks meanwhile; the interval after the decrease only sets full_at.
--@include server_clock
--@include gcra_state
--@include gcra_rate
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local pause = tonumber(ARGV[3])
local now = server_clock({}, {ARGV[7]})

local _, _, factor = gcra_rate({KEYS[2]}, {interval, burst, now})
factor = math.min(factor or 1, 1)
if ARGV[4] ~= '' then
  factor = math.max(tonumber(ARGV[5]), factor * tonumber(ARGV[4]))
  redis.call('HSET', KEYS[2], 'factor', string.format('%.17g', factor),
             'factor_at', string.format('%.0f', now), 'recover', ARGV[6])
end
local slowed_interval, slowed_burst = gcra_rate({KEYS[2]}, {interval, burst, now})

local allow_at = now + pause
local held = gcra_state({KEYS[1]}, {now})
if held and held > allow_at then allow_at = held end
local full_at = allow_at + (slowed_burst - 1) * slowed_interval
redis.call('SET', KEYS[1], string.format('%.0f %.0f', allow_at, full_at),
           'PX', math.ceil((full_at - now) / 1000) + 1000)
return {allow_at, math.floor(factor * 1000000)}
