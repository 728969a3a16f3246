-- dedupe_claim.lua: claim a call's dedupe key for a new task id, or name the task that holds it.
--
-- KEYS[1]  the lock: hash {id, st, at, dl, ex}, e.g. tuning:dd:{tasks.render}:l:<sha256>
-- KEYS[2]  the task's index: zset digest -> lock expiry (µs), e.g. tuning:dd:{tasks.render}:idx
-- ARGV[1]  task id   ARGV[2]  ttl (µs): the lock's whole life at most   ARGV[3]  the key's digest
-- ARGV[4]  now in µs, or '' for the server's TIME
-- Returns: {status, holder id, state, deadline (µs)}; status 1: claimed for ARGV[1] (state 'q',
--          queued); 2: ARGV[1] holds it already; 0: another task holds it (the caller's duplicate).
-- Lock fields: id (holder), st ('q' queued | 'r' running), at (claimed, µs), dl (deadline: at +
-- ttl, never extended), ex (expiry, µs: dl while queued, at most one lease TTL ahead while running).
-- A lock whose ex has passed is free (the key's PEXPIRE, a second later, only reclaims memory).
-- Touches KEYS[1] and KEYS[2] (one hash tag: the task's name). Both expire: the lock a second after
-- ex, the index a second after its latest member; expired members are dropped by every write.
-- Mirrors celery_tuning.storage.dedupe.MemoryDedupeStore.claim (one contract suite runs both).
--@include server_clock
local now = server_clock({}, {ARGV[4]})
local held = redis.call('HMGET', KEYS[1], 'id', 'st', 'dl', 'ex')
if held[1] and (tonumber(held[4]) or 0) > now then
  local status = 0
  if held[1] == ARGV[1] then status = 2 end
  return {status, held[1], held[2], held[3]}
end
local deadline = now + tonumber(ARGV[2])
local dl = string.format('%.0f', deadline)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'st', 'q', 'at', string.format('%.0f', now), 'dl', dl, 'ex', dl)
redis.call('PEXPIRE', KEYS[1], math.ceil((deadline - now) / 1000) + 1000)
redis.call('ZADD', KEYS[2], dl, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now))
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[2], math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
return {1, ARGV[1], 'q', dl}
