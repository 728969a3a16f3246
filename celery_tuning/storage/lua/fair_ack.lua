-- fair_ack.lua: the dispatcher published a message it claimed: the claim and the payload go, if
-- that claim still owns it.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  the queue's key stem   ARGV[4]  message id   ARGV[5]  the pub it was claimed with
-- Returns: 1 when the ticket's pub is still ARGV[5] and the message is claimed (claim and payload
-- dropped; the ticket kept to recognise duplicates, the window entry kept until the worker
-- starts it), else 0: no-op (a later claim owns it, a worker already started it, or Redis lost it).
-- Touches: the queue's keys.
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.ack.
--@include server_clock
--@include fair_trim
--@include fair_owned
local now = server_clock({}, {ARGV[1]})
local id = ARGV[4]
fair_trim(KEYS, {now})
if not fair_owned(KEYS, {id, ARGV[5]}) then
  return 0
end
redis.call('ZREM', KEYS[4], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HDEL', KEYS[3], id)
return 1
