-- debounce_trim.lua: drop up to 100 tickets whose keeping time has passed (bounded work per call).
-- Not run alone: included ("--@include debounce_trim") by the debounce_*.lua scripts.
--
-- KEYS     one task's debounce keys, as every debounce_*.lua script receives them (see debounce_call.lua)
-- ARGV[1]  now in µs (a number)
-- Returns: how many tickets were dropped.
-- Touches: KEYS[3] (tix), KEYS[4] (tixat).
-- Mirrors celery_tuning.storage.debounce._TaskState.trim.
local old = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', string.format('%.0f', ARGV[1]), 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[3], id)
  redis.call('ZREM', KEYS[4], id)
end
return #old
