-- fair_start.lua: may a worker run a fair message a dispatcher published? It leaves the window.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  the queue's key stem   ARGV[4]  message id   ARGV[5]  the pub in the message's header
-- ARGV[6]  the message's key digest
-- ARGV[7]  the dispatchers' wake channel ('' none)   ARGV[8]  what to announce on it ("fq:<queue>")
-- ARGV[9]  how long a capped key's started message still counts against its cap (µs)
-- Returns: 0 for a stale duplicate (the ticket's pub is higher: a later claim published it again
-- after a dispatcher died between publishing and acknowledging): drop it. Else 1: run it. A
-- missing ticket (trimmed, or Redis lost its state) answers 1 (never lose a task); the same pub
-- again (a broker redelivery) answers 1 again. On 1 the ticket becomes "<pub>:r" and the message
-- leaves the claims and the window: no later claim publishes it again. In a capped key's released
-- set it stays ARGV[9] more: the worker takes its concurrency lease just after this script, and
-- a release in between would count neither and let one more of the key's messages out (it would
-- arrive at a full cap and park).
-- While messages wait, a start that left the window announces ARGV[8] on ARGV[7]: a dispatcher
-- fills the freed room at once instead of at its next round.
-- Touches: the queue's keys, the key's released set.
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.start.
--@include server_clock
--@include fair_trim
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local id = ARGV[4]
local pub = tonumber(ARGV[5])
fair_trim(KEYS, {now})
local ticket = redis.call('HGET', KEYS[6], id)
if ticket and tonumber(string.match(ticket, '^%d+')) > pub then
  return 0
end
redis.call('HSET', KEYS[6], id, string.format('%d:r', pub))
redis.call('ZADD', KEYS[7], string.format('%.0f', now + ttl), id)
redis.call('PEXPIRE', KEYS[6], math.ceil(ttl / 1000) + 1000)
redis.call('PEXPIRE', KEYS[7], math.ceil(ttl / 1000) + 1000)
redis.call('ZREM', KEYS[4], id)
redis.call('ZREM', KEYS[14], id)
local left = redis.call('ZREM', KEYS[5], id)
redis.call('HDEL', KEYS[2], id)
redis.call('HDEL', KEYS[3], id)
redis.call('ZADD', ARGV[3] .. ':p:' .. ARGV[6], 'XX', string.format('%.0f', now + tonumber(ARGV[9])), id)
if left == 1 and ARGV[7] ~= '' and (tonumber(redis.call('HGET', KEYS[12], 'n')) or 0) > 0 then
  redis.call('PUBLISH', ARGV[7], ARGV[8])
end
return 1
