-- dedupe_release.lua: free a call's lock, only if this task id still holds it (compare and delete).
--
-- KEYS[1]  the lock (see dedupe_claim.lua)   KEYS[2]  the task's index
-- ARGV[1]  task id   ARGV[2]  the key's digest   ARGV[3]  now in µs, or '' for the server's TIME
-- ARGV[4]  '' (whatever its state) or 'r' / 'q': free it only in that state (a renewer freeing a
--          finished call's lock frees it only while it runs: a re-queued call keeps it)
-- Returns: 1 when the lock was this task's and live; 0 when another task (or nobody) held it, it
--          was in another state than ARGV[4], or it had expired (an expired lock stored under this
--          id is deleted too: it was free already).
-- Touches KEYS[1] and KEYS[2] (one hash tag).
-- Mirrors celery_tuning.storage.dedupe.MemoryDedupeStore.release.
--@include server_clock
local now = server_clock({}, {ARGV[3]})
local held = redis.call('HMGET', KEYS[1], 'id', 'ex', 'st')
if held[1] ~= ARGV[1] or (ARGV[4] ~= '' and held[3] ~= ARGV[4]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[2])
if (tonumber(held[2]) or 0) > now then
  return 1
end
return 0
