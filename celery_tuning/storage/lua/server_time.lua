-- server_time.lua: the Redis server's clock, shared by every worker.
--
-- KEYS:   none
-- ARGV:   none
-- Returns: integer, milliseconds since the Unix epoch by the server's TIME (read by server_clock.lua).
-- Touches: nothing. Used by `celery tuning check` to prove scripts load, and
-- as the reference clock components compare against.
--@include server_clock
return math.floor(server_clock({}, {}) / 1000)
