-- park_touch.lua: refresh the expiry of every key of one spot after a write, so nothing lives forever.
-- Not run alone: included ("--@include park_touch") by the park_*.lua scripts that write.
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs (a number)   ARGV[2]  ticket TTL in µs (a number)
-- Returns: the expiry set, in ms.
-- Touches: KEYS[1..7] (PEXPIRE; a missing key stays missing). Never KEYS[8] (the standby set
-- keeps the short expiry park_standby.lua gives it). At a caller key's spot, KEYS[9] (its limit's
-- key index) too, only ever lengthened: it outlives every listed spot's keys.
-- The expiry outlives the latest due time, claim expiry and published expiry by the ticket TTL (and 1 s),
-- so an entry, its claim and its ticket all outlive their use.
--@include park_keyed
local horizon = ARGV[1]
for _, k in ipairs({KEYS[1], KEYS[4], KEYS[7]}) do
  local last = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) > horizon then
    horizon = tonumber(last[2])
  end
end
local ms = math.ceil((horizon - ARGV[1] + ARGV[2]) / 1000) + 1000
for i = 1, 7 do
  redis.call('PEXPIRE', KEYS[i], ms)
end
if park_keyed(KEYS, ARGV) and redis.call('PTTL', KEYS[9]) < ms then
  redis.call('PEXPIRE', KEYS[9], ms)
end
return ms
