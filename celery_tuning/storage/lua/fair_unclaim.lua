-- fair_unclaim.lua: a dispatcher gives back a message it claimed without publishing it (its task
-- belongs to another app sharing the tuning Redis): its claim expires soon, then any dispatcher
-- publishes it again (with pub + 1), as when a dispatcher dies.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  the queue's key stem   ARGV[4]  message id   ARGV[5]  the pub it was claimed with
-- ARGV[6]  how soon the claim expires (µs)
-- Returns: 1 when that claim still owned the message, else 0: no-op.
-- Touches: the queue's claims.
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.unclaim.
--@include server_clock
local now = server_clock({}, {ARGV[1]})
local id = ARGV[4]
local ticket = redis.call('HGET', KEYS[6], id)
if not ticket or string.sub(ticket, -2) == ':r' or tonumber(string.match(ticket, '^%d+')) ~= tonumber(ARGV[5]) then
  return 0
end
if not redis.call('ZSCORE', KEYS[4], id) then
  return 0
end
redis.call('ZADD', KEYS[4], string.format('%.0f', now + tonumber(ARGV[6])), id)
return 1
