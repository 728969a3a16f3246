-- fair_touch.lua: refresh the expiry of a queue's fixed fair keys after a write.
-- Not run alone: included ("--@include fair_touch") by the fair_*.lua scripts that write.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  ticket TTL in µs
-- Returns: the expiry set, in ms.
-- Touches: KEYS[1..14] (PEXPIRE; a missing key stays missing).
-- Every key outlives the queue's last write, or a dispatcher's last round, by the ticket TTL and
-- 1 s: waiting messages, their claims and the tickets of what was released outlive their use while
-- any producer or dispatcher uses the queue, and nothing lives forever once nobody does. The
-- keys all get one expiry in one script: they expire together, never one before the others (every
-- key's waiting ids are in the line hash, KEYS[13], not in keys of their own). A capped key's
-- released set (stem:p:<digest>) bounds itself (the window's TTL).
local ms = math.ceil(tonumber(ARGV[1]) / 1000) + 1000
for i = 1, 14 do
  redis.call('PEXPIRE', KEYS[i], ms)
end
return ms
