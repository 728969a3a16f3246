-- park_standby.lua: a woken concurrency waiter that found no free slot holds on for the next one
-- (it becomes a standby), or lets go.
--
-- KEYS     one spot's keys (see park_add.lua); only [8] (standby) is used
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (unused)
-- ARGV[3]  '+' (hold on) or '-' (let go)   ARGV[4]  the standby's token
-- ARGV[5]  '+': how long it may hold on (µs)   ARGV[6]  '+': standby slots (most live standbys)
-- Returns: '+': 1 when it is a standby now (fewer than ARGV[6] live standbys were there), else 0;
--          '-': 1 when the token was there (removed), else 0.
-- Touches: KEYS[8] only: expired standbys dropped, its expiry kept past the latest standby's
-- (never longer: a standby whose worker died is gone within its own time).
-- Mirrors celery_tuning.storage.park.MemoryParkStore.standby / unstandby.
--@include server_clock
local now = server_clock({}, {ARGV[1]})
if ARGV[3] == '-' then
  return redis.call('ZREM', KEYS[8], ARGV[4])
end
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', string.format('%.0f', now))
if redis.call('ZCARD', KEYS[8]) >= tonumber(ARGV[6]) then
  return 0
end
redis.call('ZADD', KEYS[8], string.format('%.0f', now + tonumber(ARGV[5])), ARGV[4])
local last = redis.call('ZRANGE', KEYS[8], -1, -1, 'WITHSCORES')
redis.call('PEXPIRE', KEYS[8], math.ceil((tonumber(last[2]) - now) / 1000) + 1000)
return 1
