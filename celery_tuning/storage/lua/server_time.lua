-- server_time.lua: the Redis server's clock, shared by every worker.
--
-- KEYS:   none
-- ARGV:   none
-- Returns: integer, milliseconds since the Unix epoch by the server's TIME.
-- Touches: nothing. Used by `celery tuning check` to prove scripts load, and
-- as the reference clock components compare against.
local t = redis.call('TIME')
return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
