-- gcra_acquire.lua: one GCRA decision, atomically, on the Redis server's clock.
--
-- KEYS[1]  bucket TAT key (string: integer microseconds)        e.g. tuning:rl:{openai}
-- KEYS[2]  limiter override hash (same hash tag as KEYS[1])      e.g. tuning:rl:{openai}:conf
--          fields: interval (µs), burst, factor, factor_at (µs), recover (factor per µs)
-- ARGV[1]  interval: emission interval, integer microseconds
-- ARGV[2]  burst: bucket capacity, integer >= 1
-- ARGV[3]  cost: tokens taken, integer >= 1
-- ARGV[4]  reserve: largest wait (µs) for which a future slot is taken; -1 never
-- ARGV[5]  now override in µs ('' = use TIME; tests pass a fixed clock)
-- Returns: {allowed (1|0), wait_us (integer), interval_us used, burst used}
--          allowed=1,wait=0 admitted now; allowed=1,wait>0 slot reserved wait µs ahead;
--          allowed=0 refused, admitted in wait µs.
-- Units:   microseconds throughout; TAT keys expire (PEXPIRE, ms) once the bucket is idle.
-- Mirrors celery_tuning.policy.gcra.gcra_acquire (the differential tests compare both).
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local reserve = tonumber(ARGV[4])
local now
if ARGV[5] ~= nil and ARGV[5] ~= '' then
  now = tonumber(ARGV[5])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local conf = redis.call('HMGET', KEYS[2], 'interval', 'burst', 'factor', 'factor_at', 'recover')
if conf[1] then interval = tonumber(conf[1]) end
if conf[2] then burst = tonumber(conf[2]) end
if conf[3] then
  -- adaptive mode: the rate is scaled by factor, which recovers linearly towards 1
  local factor = tonumber(conf[3]) + tonumber(conf[5] or 0) * (now - tonumber(conf[4] or now))
  if factor < 1 then
    interval = math.floor(interval / factor)
  else
    redis.call('HDEL', KEYS[2], 'factor', 'factor_at', 'recover')
  end
end

local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + cost * interval
local wait = new_tat - burst * interval - now
if wait <= 0 or reserve >= wait then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
             'PX', math.ceil((new_tat - now) / 1000) + 1000)
  if wait < 0 then wait = 0 end
  return {1, wait, interval, burst}
end
return {0, wait, interval, burst}
