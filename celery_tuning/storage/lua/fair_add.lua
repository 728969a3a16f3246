-- fair_add.lua: a producer's call of a @fair task joins the end of its key's list.
--
-- KEYS (every fair_*.lua script receives one queue's keys in this order; storage/keys.py fair_keys)
--   [1] ring (list of key digests with waiting messages, round-robin order, each at most once)
--   [2] msg (hash id -> payload)        [3] own (hash id -> key digest)
--   [4] claim (zset id -> claim expiry µs: claimed by a dispatcher, not acknowledged)
--   [5] win (zset id -> window expiry µs: released, not started)
--   [6] tix (hash id -> "<pub>" or "<pub>:r")   [7] tixat (zset id -> when the ticket may go, µs)
--   [8] kw (hash digest -> weight)      [9] kc (hash digest -> "<cap> <lease set>")
--   [10] wk (zset consumer node -> registration expiry µs)   [11] wkc (hash node -> capacity)
--   [12] stat (hash: n waiting messages, r released in total)
--   [13] line (hash: each key's FIFO of waiting ids, see fair_line.lua)
--   [14] dead (zset id -> when it was set aside as undeliverable, µs; see fair_reject.lua)
--   [15] optional: the index set (single server only; on a Cluster fair_index.lua runs first)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  the queue's key stem (P:fq:{Q})
-- ARGV[4]  message id (the task id)   ARGV[5]  key digest   ARGV[6]  payload (JSON)
-- ARGV[7]  the key's weight (an integer >= 1)
-- ARGV[8]  the key's concurrency cap, or '' for none   ARGV[9]  its lease set (with a cap)
-- ARGV[10] the queue's index member (the queue name)
-- Returns: 1 added; 2 the id already waits, is claimed, was released and has not started (its
-- ticket is "<pub>": it keeps its first arguments) or is undeliverable (nothing changes); 0 the
-- id's ticket says it ran (nothing waits).
-- Touches: the queue's keys, the index; expiries refreshed (fair_touch).
-- A key joins the ring with its first waiting message (its line's depth becomes 1): a key is in the
-- ring exactly while messages wait under it, so the dispatcher's cost follows released messages,
-- not keys.
-- The key's weight becomes this call's. Its cap becomes this call's when the call has one; a call
-- without one (another task of the queue, with no @concurrency_limit, called with the same key
-- value) leaves a cap in place: a capped call is never fetched only to be refused at its cap, at
-- the price of the key's uncapped calls being released within that cap too, until the key's
-- messages all left (then the key leaves the ring, with its weight and cap).
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.add.
--@include server_clock
--@include fair_trim
--@include fair_touch
--@include fair_line
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local id, d = ARGV[4], ARGV[5]
fair_trim(KEYS, {now})
local ticket = redis.call('HGET', KEYS[6], id)
if ticket and string.sub(ticket, -2) == ':r' then
  return 0
end
if ticket or redis.call('HEXISTS', KEYS[2], id) == 1 then
  return 2
end
if fair_line(KEYS, {'push', d, id}) == 1 then
  redis.call('RPUSH', KEYS[1], d)
end
redis.call('HSET', KEYS[2], id, ARGV[6])
redis.call('HSET', KEYS[3], id, d)
if ARGV[7] ~= '1' then
  redis.call('HSET', KEYS[8], d, ARGV[7])
else
  redis.call('HDEL', KEYS[8], d)
end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[9], d, ARGV[8] .. ' ' .. ARGV[9])
end
redis.call('HINCRBY', KEYS[12], 'n', 1)
local ms = fair_touch(KEYS, {ttl})
if KEYS[15] then
  redis.call('SADD', KEYS[15], ARGV[10])
  redis.call('PEXPIRE', KEYS[15], ms)
end
return 1
