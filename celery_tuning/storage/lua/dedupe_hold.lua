-- dedupe_hold.lua: keep the locks of one task's calls: renew running ones, park queued ones again.
--
-- KEYS[1]  the task's index (see dedupe_claim.lua)   KEYS[2..n]  locks, one per call
-- ARGV[1]  state: 'r' (running: renewal by the worker's renewer thread) or 'q' (queued again: the
--          call was retried or deferred, its new message waits)
-- ARGV[2]  lease TTL (µs)   ARGV[3]  now in µs, or '' for the server's TIME
-- ARGV[4..]  per lock KEYS[i + 1], three values: task id, the key's digest, deadline (µs)
-- Returns: how many locks were missing (flushed, restarted, failed over, expired) and re-created.
-- A lock another task holds now is left alone (it was lost and claimed anew: both calls run). A
-- renewal ('r') leaves its own call's queued lock alone: the call re-queued it (a retry, a
-- deferral) while the renewal was on its way, and its new message must keep it. A lock past its
-- deadline is released and not re-created: ttl bounds a lock's life whatever happens. Running:
-- expires one lease TTL ahead (at most the deadline); queued: at the deadline.
-- Touches KEYS (one hash tag: the task's name).
-- Mirrors celery_tuning.storage.dedupe.MemoryDedupeStore.hold.
--@include server_clock
local now = server_clock({}, {ARGV[3]})
local state = ARGV[1]
local lease = tonumber(ARGV[2])
local recreated = 0
for i = 2, #KEYS do
  local base = 4 + (i - 2) * 3
  local id, digest, deadline = ARGV[base], ARGV[base + 1], tonumber(ARGV[base + 2])
  local held = redis.call('HMGET', KEYS[i], 'id', 'ex', 'st')
  local live = held[1] and (tonumber(held[2]) or 0) > now
  if live and held[1] ~= id then
    -- another call's lock now: leave it
  elseif live and state == 'r' and held[3] == 'q' then
    -- re-queued by its own call: stays queued
  elseif deadline <= now then
    if held[1] == id then
      redis.call('DEL', KEYS[i])
      redis.call('ZREM', KEYS[1], digest)
    end
  else
    if not live then
      recreated = recreated + 1
      redis.call('DEL', KEYS[i])
      redis.call('HSET', KEYS[i], 'id', id, 'at', string.format('%.0f', now), 'dl', string.format('%.0f', deadline))
    end
    local expires = deadline
    if state == 'r' then expires = math.min(now + lease, deadline) end
    local ex = string.format('%.0f', expires)
    redis.call('HSET', KEYS[i], 'st', state, 'ex', ex)
    redis.call('PEXPIRE', KEYS[i], math.ceil((expires - now) / 1000) + 1000)
    redis.call('ZADD', KEYS[1], ex, digest)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now))
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] then
  redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
end
return recreated
