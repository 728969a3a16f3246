-- dedupe_peek.lua: read locks for `celery tuning dedupe show` (read-only).
--
-- KEYS[1..n]  locks (see dedupe_claim.lua), of one task (one hash tag)
-- ARGV[1]  now in µs, or '' for the server's TIME
-- Returns: {now, then per lock: id, state, claimed at (µs), deadline (µs), expiry (µs)}, with id ''
--          for a lock that is gone or expired.
-- Mirrors celery_tuning.storage.dedupe.MemoryDedupeStore.locks.
--@include server_clock
local now = server_clock({}, {ARGV[1]})
local out = {string.format('%.0f', now)}
for i = 1, #KEYS do
  local held = redis.call('HMGET', KEYS[i], 'id', 'st', 'at', 'dl', 'ex')
  if held[1] and (tonumber(held[5]) or 0) > now then
    for j = 1, 5 do out[#out + 1] = held[j] end
  else
    for _ = 1, 5 do out[#out + 1] = '' end
  end
end
return out
