-- fair_purge.lua: drop up to ARGV[2] waiting messages of a queue, or of one key of it (an operator's
-- purge; results stay PENDING); claimed and released messages are left to finish.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  the queue's key stem   ARGV[2]  most messages dropped in this call
-- ARGV[3]  a key digest: only that key's messages; '' (or absent): every key's
-- Returns: how many were dropped (call again while it answers ARGV[2]).
-- Touches: the queue's keys, the dropped keys' lists.
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.purge.
local most = tonumber(ARGV[2])
local dropped = 0
local function forget(d)
  redis.call('HDEL', KEYS[8], d, 'u:' .. d)
  redis.call('HDEL', KEYS[9], d)
end
local only = ARGV[3] or ''
if only ~= '' then
  local list = ARGV[1] .. ':k:' .. only
  local ids = redis.call('LRANGE', list, 0, most - 1)
  for _, id in ipairs(ids) do
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  end
  redis.call('LTRIM', list, #ids, -1)
  if #ids > 0 then
    redis.call('HINCRBY', KEYS[12], 'n', -#ids)  -- not -0: a Lua number sent as "-0" is no integer to Redis
  end
  if redis.call('LLEN', list) == 0 then
    -- O(keys in the ring), once per purged key: an operator's command, not the dispatcher's path.
    redis.call('LREM', KEYS[1], 0, only)
    forget(only)
  end
  return #ids
end
while dropped < most do
  local d = redis.call('LPOP', KEYS[1])
  if not d then
    break
  end
  local list = ARGV[1] .. ':k:' .. d
  local ids = redis.call('LRANGE', list, 0, most - dropped - 1)
  for _, id in ipairs(ids) do
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
  end
  redis.call('LTRIM', list, #ids, -1)
  redis.call('HINCRBY', KEYS[12], 'n', -#ids)
  dropped = dropped + #ids
  if redis.call('LLEN', list) > 0 then
    redis.call('LPUSH', KEYS[1], d)
  else
    forget(d)
  end
end
return dropped
