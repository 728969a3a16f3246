-- gcra_acquire.lua: one GCRA decision, atomically, on the Redis server's clock.
--
-- KEYS[1]  bucket key (string "allow_at full_at", integer µs)    e.g. tuning:rl:{openai}
-- KEYS[2]  limiter override hash (same hash tag as KEYS[1])      e.g. tuning:rl:{openai}:conf
--          fields: interval (µs), burst, factor, factor_at (µs), recover (factor per µs)
-- ARGV[1]  "interval burst cost reserve" in one space-separated string (one argument to
--          encode and send instead of four keeps the round trip near a bare EVALSHA):
--            interval: emission interval, integer microseconds
--            burst:    bucket capacity, integer >= 1
--            cost:     tokens taken, integer >= 1
--            reserve:  largest wait (µs) for which a future slot is taken; -1 never
-- ARGV[2]  optional now override in µs (absent: the server's TIME; tests pass a fixed clock)
-- Returns: one integer r (a single small reply keeps the round trip close to a bare EVALSHA):
--          r = 0 admitted now; r > 0 slot reserved r µs ahead; r < 0 refused, admitted in -r µs.
-- Units:   microseconds throughout; the key expires (PEXPIRE, ms) a second after full_at.
-- Mirrors celery_tuning.policy.gcra.gcra_acquire (the differential tests compare both); the
-- clock, the bucket and the rate after override and adaptive factor come from server_clock.lua,
-- gcra_state.lua and gcra_rate.lua, shared with gcra_pause.lua.
--@include server_clock
--@include gcra_state
--@include gcra_rate
local a_interval, a_burst, a_cost, a_reserve = string.match(ARGV[1], '^(%d+) (%d+) (%d+) (%-?%d+)$')
if a_interval == nil then
  return redis.error_reply('gcra_acquire: ARGV[1] must be "interval burst cost reserve"')
end
local cost = tonumber(a_cost)
local reserve = tonumber(a_reserve)
local now = server_clock({}, {ARGV[2]})
local interval, burst, factor = gcra_rate({KEYS[2]}, {a_interval, a_burst, now})
if factor and factor >= 1 then
  -- fully recovered: forget the factor so later calls skip the arithmetic
  redis.call('HDEL', KEYS[2], 'factor', 'factor_at', 'recover')
end

local base = now - (burst - 1) * interval
local allow_at = gcra_state({KEYS[1]}, {now})
if allow_at and allow_at > base then base = allow_at end
-- A cost above the burst in force (an operator lowered it with `limit set --burst`) waits for a
-- full bucket, not for a moment that never comes; the rest of its cost is debt on later calls.
local need = cost
if need > burst then need = burst end
local wait = base + (need - 1) * interval - now
if wait > 0 and reserve < wait then
  return -wait
end
allow_at = base + cost * interval
local full_at = allow_at + (burst - 1) * interval
redis.call('SET', KEYS[1], string.format('%.0f %.0f', allow_at, full_at),
           'PX', math.ceil((full_at - now) / 1000) + 1000)
if wait < 0 then wait = 0 end
return wait
