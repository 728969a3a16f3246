-- park_trim.lua: drop up to 100 tickets whose keeping time has passed (bounded work per call).
-- Not run alone: included ("--@include park_trim") by the park_*.lua scripts.
--
-- KEYS     one spot's keys, as every park_*.lua script receives them (see park_add.lua)
-- ARGV[1]  now in µs (a number)
-- Returns: how many tickets were dropped.
-- Touches: KEYS[5] (tix), KEYS[6] (tixat).
-- Mirrors celery_tuning.storage.park._SpotState.trim.
local old = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', string.format('%.0f', ARGV[1]), 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[5], id)
  redis.call('ZREM', KEYS[6], id)
end
return #old
