-- dedupe_start.lua: a task's body starts: its lock turns running (or ends, for until='started').
--
-- KEYS[1]  the lock (see dedupe_claim.lua)   KEYS[2]  the task's index
-- ARGV[1]  task id   ARGV[2]  lease TTL (µs)   ARGV[3]  ttl (µs, for a lock made here)
-- ARGV[4]  '1': keep the lock while running (until='done'); '0': release it (until='started')
-- ARGV[5]  the key's digest   ARGV[6]  now in µs, or '' for the server's TIME
-- Returns: {status, holder id, state, deadline (µs)}; status 0: another task holds the key (this
--          one runs without it: sent by send_task, or a canvas member published beside a holder);
--          1: the lock was free and is now this task's (running; released: state ''); 2: the task
--          held it (now running; released: state '').
-- A running lock expires one lease TTL after its last renewal (dedupe_hold.lua), never after its
-- deadline: a worker killed mid-run frees the key within the lease TTL.
-- Touches KEYS[1] and KEYS[2] (one hash tag).
-- Mirrors celery_tuning.storage.dedupe.MemoryDedupeStore.start.
--@include server_clock
local now = server_clock({}, {ARGV[6]})
local held = redis.call('HMGET', KEYS[1], 'id', 'st', 'dl', 'ex')
local live = held[1] and (tonumber(held[4]) or 0) > now
if live and held[1] ~= ARGV[1] then
  return {0, held[1], held[2], held[3]}
end
local status = 1
if live then status = 2 end
if ARGV[4] ~= '1' then
  if live then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[5])
  end
  return {status, ARGV[1], '', '0'}
end
local deadline
if live then
  deadline = tonumber(held[3]) or (now + tonumber(ARGV[3]))
else
  deadline = now + tonumber(ARGV[3])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'id', ARGV[1], 'at', string.format('%.0f', now),
             'dl', string.format('%.0f', deadline))
end
local expires = math.min(now + tonumber(ARGV[2]), deadline)
local ex = string.format('%.0f', expires)
redis.call('HSET', KEYS[1], 'st', 'r', 'ex', ex)
redis.call('PEXPIRE', KEYS[1], math.ceil((expires - now) / 1000) + 1000)
redis.call('ZADD', KEYS[2], ex, ARGV[5])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('%.0f', now))
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
if last[2] then
  redis.call('PEXPIRE', KEYS[2], math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
end
return {status, ARGV[1], 'r', string.format('%.0f', deadline)}
