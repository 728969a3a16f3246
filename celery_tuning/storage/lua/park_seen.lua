-- park_seen.lua: was this park id parked at the spot (its entry or its ticket is there: parked,
-- claimed, published or run)? Read-only.
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs, or '' (unused)      ARGV[2]  ticket TTL (unused)   ARGV[3]  park id
-- Returns: 1 when the spot holds the park id's payload or ticket, else 0.
-- Used for a message the broker redelivered (task_acks_late, its worker died after parking it
-- and before acking): its parked copy owns the run, so the original is dropped.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.seen.
if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 1 then
  return 1
end
return redis.call('HEXISTS', KEYS[5], ARGV[3])
