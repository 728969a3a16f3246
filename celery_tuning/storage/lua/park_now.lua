-- park_now.lua: the Redis server's clock in µs (the clock every park_*.lua script keeps time by).
--
-- KEYS: none   ARGV: none
-- Returns: now in µs.   Touches: nothing.
--@include server_clock
return server_clock({}, {})
