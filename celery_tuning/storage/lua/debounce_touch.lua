-- debounce_touch.lua: extend the expiry of a task's debounce keys after a write (never shorten it).
-- Not run alone: included ("--@include debounce_touch") by the debounce_*.lua scripts that write.
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs   ARGV[2]  ticket TTL in µs   ARGV[3]  latest time (µs) the written state is needed
-- Returns: the expiry wanted, in ms.
-- Touches: KEYS[1..4] (PEXPIRE when the key's expiry is shorter; a missing key stays missing).
-- Every key outlives the latest look-again time in KEYS[1] (and ARGV[3]: a pending run due
-- after its in-flight run's mark) by the ticket TTL and 1 s: a pending run, its claim and the
-- tickets of what was published all outlive their use, and nothing lives forever. Only ever
-- extended: the keys hold every debounce key of the task, and one key's write must not cut
-- short what another needs.
local horizon = tonumber(ARGV[3])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] and tonumber(last[2]) > horizon then
  horizon = tonumber(last[2])
end
local ms = math.ceil((horizon - ARGV[1] + ARGV[2]) / 1000) + 1000
for i = 1, 4 do
  local left = redis.call('PTTL', KEYS[i])
  if left == -1 or (left >= 0 and left < ms) then
    redis.call('PEXPIRE', KEYS[i], ms)
  end
end
return ms
