-- fair_trim.lua: drop up to 100 tickets, and up to 100 undeliverable messages (with their payloads),
-- whose keeping time has passed (bounded work per call).
-- Not run alone: included ("--@include fair_trim") by the fair_*.lua scripts that write.
--
-- KEYS     one queue's fair keys, as every fair_*.lua script receives them (see fair_add.lua)
-- ARGV[1]  now in µs (a number)
-- Returns: how many tickets and undeliverable messages were dropped.
-- Touches: KEYS[6] (tix), KEYS[7] (tixat); KEYS[14] (undeliverable, scored by when each goes),
-- KEYS[2] (msg) and KEYS[3] (own) of those.
-- Mirrors celery_tuning.storage.fair._QueueState.trim.
local old = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', string.format('%.0f', ARGV[1]), 'LIMIT', 0, 100)
for _, id in ipairs(old) do
  redis.call('HDEL', KEYS[6], id)
  redis.call('ZREM', KEYS[7], id)
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[14], '-inf', string.format('%.0f', ARGV[1]), 'LIMIT', 0, 100)
for _, id in ipairs(dead) do
  redis.call('ZREM', KEYS[14], id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('HDEL', KEYS[3], id)
end
return #old + #dead
