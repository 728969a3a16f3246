-- fair_purge.lua: drop up to ARGV[2] waiting messages of a queue, or of one key of it (an operator's
-- purge; results stay PENDING); claimed and released messages are left to finish.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  the queue's key stem   ARGV[2]  most messages dropped in this call
-- ARGV[3]  a key digest: only that key's messages; '' (or absent): every key's
-- Returns: how many were dropped (call again while it answers ARGV[2]).
-- Touches: the queue's keys.
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.purge.
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
  return dropped
end
while dropped < most do
  local d = redis.call('LPOP', KEYS[1])
  if not d then
    break
  end
  if not drop(d, most - dropped) then
    redis.call('LPUSH', KEYS[1], d)
  end
end
return dropped
