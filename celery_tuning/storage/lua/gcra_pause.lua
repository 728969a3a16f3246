-- gcra_pause.lua: hold a limiter for every worker (the remote API answered "slow down").
--
-- KEYS[1]  bucket TAT key            KEYS[2]  limiter override hash (same hash tag)
-- ARGV[1]  interval (µs)             ARGV[2]  burst
-- ARGV[3]  pause (µs): nothing is admitted before now + pause
-- ARGV[4]  adaptive decrease: multiply the rate factor by this (e.g. 0.5); '' = not adaptive
-- ARGV[5]  smallest factor (e.g. 0.05)
-- ARGV[6]  recovery per µs (factor units), e.g. 1 / 60e6 recovers fully in a minute
-- ARGV[7]  now override in µs ('' = TIME)
-- Returns: {new TAT (µs), factor after the decrease * 1e6 as an integer (1e6 when not adaptive)}
-- Mirrors celery_tuning.policy.gcra.gcra_pause for the TAT.
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local pause = tonumber(ARGV[3])
local now
if ARGV[7] ~= nil and ARGV[7] ~= '' then
  now = tonumber(ARGV[7])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local conf = redis.call('HMGET', KEYS[2], 'interval', 'burst', 'factor', 'factor_at', 'recover')
if conf[1] then interval = tonumber(conf[1]) end
if conf[2] then burst = tonumber(conf[2]) end

local factor = 1
if conf[3] then
  factor = tonumber(conf[3]) + tonumber(conf[5] or 0) * (now - tonumber(conf[4] or now))
  if factor > 1 then factor = 1 end
end
if ARGV[4] ~= '' then
  factor = math.max(tonumber(ARGV[5]), factor * tonumber(ARGV[4]))
  redis.call('HSET', KEYS[2], 'factor', tostring(factor), 'factor_at', string.format('%.0f', now),
             'recover', ARGV[6])
end

local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local paused = now + pause + (burst - 1) * interval
if paused > tat then tat = paused end
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return {tat, math.floor(factor * 1000000)}
