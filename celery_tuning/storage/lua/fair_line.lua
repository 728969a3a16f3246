-- fair_line.lua: one fair key's FIFO of waiting message ids, kept in the queue's line hash.
-- Not run alone: included ("--@include fair_line") by the fair_*.lua scripts that read or write a
-- key's waiting messages.
--
-- KEYS     one queue's fair keys (see fair_add.lua); this touches KEYS[13] (line) only
-- ARGV[1]  'push', 'pop' or 'len'   ARGV[2]  the key digest   ARGV[3]  (push) the message id
-- Returns: push: the key's depth after it; pop: the id at the key's head (removed), or false when
-- none waits; len: the key's depth.
-- The line hash holds, per key digest d, "d:<n>" -> the id at position n, "d:h" the next position
-- to take and "d:t" the next to fill (both absent: nothing waits). Every key's waiting ids live in
-- this one key of the queue, which expires with the queue's other keys (fair_touch): no key's
-- messages can outlive, or be outlived by, the ring and payloads that point at them.
local line, d = KEYS[13], ARGV[2]
local ht = redis.call('HMGET', line, d .. ':h', d .. ':t')
local head, tail = tonumber(ht[1]) or 0, tonumber(ht[2]) or 0
if ARGV[1] == 'len' then
  return tail - head
end
if ARGV[1] == 'push' then
  redis.call('HSET', line, d .. ':' .. string.format('%d', tail), ARGV[3], d .. ':t', string.format('%d', tail + 1))
  return tail + 1 - head
end
if head >= tail then
  return false
end
local at = d .. ':' .. string.format('%d', head)
local id = redis.call('HGET', line, at)
if head + 1 >= tail then
  redis.call('HDEL', line, at, d .. ':h', d .. ':t')
else
  redis.call('HDEL', line, at)
  redis.call('HSET', line, d .. ':h', string.format('%d', head + 1))
end
return id
