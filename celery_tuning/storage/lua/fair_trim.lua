-- fair_trim.lua: drop up to 100 tickets whose keeping time has passed (bounded work per call).
-- Not run alone: included ("--@include fair_trim") by the fair_*.lua scripts that write.
--
-- KEYS     one queue's fair keys, as every fair_*.lua script receives them (see fair_add.lua)
-- ARGV[1]  now in µs (a number)
-- Returns: how many tickets were dropped.
-- Touches: KEYS[6] (tix), KEYS[7] (tixat).
-- Mirrors celery_tuning.storage.fair._QueueState.trim.
local old = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', string.format('%.0f', ARGV[1]), 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[6], id)
  redis.call('ZREM', KEYS[7], id)
end
return #old
