-- dedupe_drop.lua: drop locks whoever holds them (`celery tuning dedupe clear`).
--
-- KEYS[1]  the task's index (see dedupe_claim.lua)   KEYS[2..n]  locks of that task
-- ARGV[1..n-1]  the digest of each lock, in KEYS order   ARGV[n]  now in µs, or '' for the server's TIME
-- Returns: how many of them were live (held and not expired) when dropped.
-- Touches KEYS (one hash tag). A running task's renewer puts its lock back at its next renewal:
-- the task is still running.
--@include server_clock
local now = server_clock({}, {ARGV[#KEYS]})
local dropped = 0
for i = 2, #KEYS do
  local ex = redis.call('HGET', KEYS[i], 'ex')
  if (tonumber(ex) or 0) > now then dropped = dropped + 1 end
  redis.call('DEL', KEYS[i])
  redis.call('ZREM', KEYS[1], ARGV[i - 1])
end
return dropped
