-- server_clock.lua: now, in integer microseconds, for every script that keeps time (GCRA
-- buckets, leases). Not run alone: included ("--@include server_clock") as a local function, so
-- every script reads time one way.
--
-- KEYS:    none
-- ARGV[1]  optional now override in µs (absent or '': the server's TIME; tests pass a fixed clock)
-- Returns: now in µs (a Lua number: exact, epoch µs stay far below 2^53).
-- Touches: nothing.
if ARGV[1] ~= nil and ARGV[1] ~= '' then
  return tonumber(ARGV[1])
end
local t = redis.call('TIME')
return tonumber(t[1]) * 1000000 + tonumber(t[2])
