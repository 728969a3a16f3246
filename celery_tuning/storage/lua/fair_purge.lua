-- fair_purge.lua: drop up to ARGV[2] of a queue's messages not yet published: waiting, claimed and
-- undeliverable, or those of one key of it (an operator's purge; results stay PENDING).
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  the queue's key stem   ARGV[2]  most messages dropped in this call
-- ARGV[3]  a key digest: only that key's messages; '' (or absent): every key's
-- ARGV[4]  now in µs, or '' for the server's TIME      ARGV[5]  ticket TTL (µs)
-- Returns: how many were dropped (call again while it answers ARGV[2]).
-- Touches: the queue's keys, capped keys' released sets.
-- Waiting messages go first, then claimed ones, then undeliverable ones. A claimed message may be
-- on its way (its dispatcher publishing it right now): its ticket goes one publication up, so the
-- copy is dropped by the worker at its start (as a stale duplicate), never run, and its
-- dispatcher's ack finds no claim. Messages published (acknowledged) are left to run. Claimed and
-- undeliverable messages are few (the windows' size, the failures'): looking through them all
-- for one key's is an operator's command's cost, not the dispatcher's.
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.purge.
--@include server_clock
--@include fair_line
local most = tonumber(ARGV[2])
local dropped = 0
-- Drops up to `up_to` of key d's waiting messages; true when none are left.
local function drop(d, up_to)
  local n = 0
  while n < up_to do
    local id = fair_line(KEYS, {'pop', d})
    if not id then
      break
    end
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    n = n + 1
  end
  if n > 0 then
    redis.call('HINCRBY', KEYS[12], 'n', -n)  -- never -0: a Lua number sent as "-0" is no integer to Redis
  end
  dropped = dropped + n
  if fair_line(KEYS, {'len', d}) > 0 then
    return false
  end
  redis.call('HDEL', KEYS[8], d, 'u:' .. d)
  redis.call('HDEL', KEYS[9], d)
  return true
end
local only = ARGV[3] or ''
if only ~= '' then
  if drop(only, most) then
    -- O(keys in the ring), once per purged key: an operator's command, not the dispatcher's path.
    redis.call('LREM', KEYS[1], 0, only)
  end
else
  while dropped < most do
    local d = redis.call('LPOP', KEYS[1])
    if not d then
      break
    end
    if not drop(d, most - dropped) then
      redis.call('LPUSH', KEYS[1], d)
    end
  end
end
if dropped >= most then
  return dropped
end
local now = server_clock({}, {ARGV[4] or ''})
local ttl = tonumber(ARGV[5] or '0')
for _, held in ipairs({KEYS[4], KEYS[14]}) do
  for _, id in ipairs(redis.call('ZRANGE', held, 0, -1)) do
    if dropped >= most then
      return dropped
    end
    local d = redis.call('HGET', KEYS[3], id)
    if only == '' or d == only then
      redis.call('ZREM', held, id)
      local ticket = redis.call('HGET', KEYS[6], id)
      if ticket and string.sub(ticket, -2) ~= ':r' then
        redis.call('HSET', KEYS[6], id, string.format('%d', tonumber(string.match(ticket, '^%d+')) + 1))
        redis.call('ZADD', KEYS[7], string.format('%.0f', now + ttl), id)
      end
      redis.call('ZREM', KEYS[5], id)
      if d then
        redis.call('ZREM', ARGV[1] .. ':p:' .. d, id)
      end
      redis.call('HDEL', KEYS[2], id)
      redis.call('HDEL', KEYS[3], id)
      dropped = dropped + 1
    end
  end
end
return dropped
