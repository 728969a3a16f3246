-- cache_store.lua: store a computed value and release the single-flight lock if we hold it.
--
-- KEYS[1]  value key            KEYS[2]  lock key (same hash tag)
-- ARGV[1]  encoded value ('' = store nothing, only release the lock: the call failed)
-- ARGV[2]  value TTL in ms      ARGV[3]  lock token of the caller
-- Returns: 1 when the lock was ours and released, else 0.
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
end
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
