-- fair_touch.lua: refresh the expiry of a queue's fixed fair keys after a write.
-- Not run alone: included ("--@include fair_touch") by the fair_*.lua scripts that write.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  ticket TTL in µs
-- Returns: the expiry set, in ms.
-- Touches: KEYS[1..12] (PEXPIRE; a missing key stays missing).
-- Every key outlives the queue's last write by the ticket TTL and 1 s: waiting messages, their
-- claims and the tickets of what was released outlive their use while any producer or dispatcher
-- uses the queue, and nothing lives forever once nobody does. A key's own list
-- (stem:k:<digest>) is refreshed where it is written (fair_add, fair_release).
local ms = math.ceil(tonumber(ARGV[1]) / 1000) + 1000
for i = 1, 12 do
  redis.call('PEXPIRE', KEYS[i], ms)
end
return ms
