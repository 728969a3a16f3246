-- fair_reject.lua: a dispatcher could not publish a message it claimed (its task is not one of its
-- app's: another app's, or a deploy removed it; or publishing it raised, e.g. options the broker
-- or Celery refuse): it leaves the window now, and is tried again after a rest, or set aside.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  the queue's key stem   ARGV[4]  message id   ARGV[5]  the pub it was claimed with
-- ARGV[6]  how soon its claim expires, to be claimed again with pub + 1 (µs)
-- ARGV[7]  attempts: a message claimed that many times (its pub) is set aside
-- ARGV[8]  most messages set aside per queue (the oldest go first)
-- Returns: 0 when that claim no longer owns the message (no-op); 1 tried again after ARGV[6];
-- 2 set aside as undeliverable: out of the claims, in KEYS[14] (its payload kept, its ticket
-- left at its pub), never released again; `tuning fair purge` drops it, a start of a copy
-- somehow published runs it, and it goes after the ticket TTL or when ARGV[8] newer ones come.
-- Either way it leaves the window (and its key's released set): a message that cannot be
-- published never holds a window place, so W of them cannot stall the queue.
-- Touches: the queue's keys, the key's released set.
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.reject.
--@include server_clock
--@include fair_trim
--@include fair_owned
--@include fair_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local id = ARGV[4]
local pub = tonumber(ARGV[5])
fair_trim(KEYS, {now})
if not fair_owned(KEYS, {id, ARGV[5]}) then
  return 0
end
redis.call('ZREM', KEYS[5], id)
local d = redis.call('HGET', KEYS[3], id)
if d then
  redis.call('ZREM', ARGV[3] .. ':p:' .. d, id)
end
if pub < tonumber(ARGV[7]) then
  redis.call('ZADD', KEYS[4], string.format('%.0f', now + tonumber(ARGV[6])), id)
  fair_touch(KEYS, {ttl})
  return 1
end
redis.call('ZREM', KEYS[4], id)
-- scored by when it goes (the ticket TTL from now): fair_trim drops it then, whatever else happens
redis.call('ZADD', KEYS[14], string.format('%.0f', now + ttl), id)
local function drop(ids)
  for _, gone in ipairs(ids) do
    redis.call('ZREM', KEYS[14], gone)
    redis.call('HDEL', KEYS[2], gone)
    redis.call('HDEL', KEYS[3], gone)
  end
end
local over = redis.call('ZCARD', KEYS[14]) - math.max(1, tonumber(ARGV[8]))
if over > 0 then
  drop(redis.call('ZRANGE', KEYS[14], 0, over - 1))
end
fair_touch(KEYS, {ttl})
return 2
