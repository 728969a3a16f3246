-- park_snapshot.lua: one spot's counts, read in one atomic step.
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV     [1] now, [2] ticket TTL: unused
-- Returns: {due, waiting, claimed, earliest due (µs) or '', head score (µs) or '', published,
-- standbys}; the head score is the earlier of the earliest due time and the first waiter's
-- sequence; published and standbys count the members of KEYS[7] and KEYS[8], expired or not.
-- Touches: nothing (read-only).
-- Mirrors celery_tuning.storage.park.MemoryParkStore.snapshot.
local first_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local first_wait = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local next_due = ''
local oldest = ''
if first_due[2] then
  next_due = tonumber(first_due[2])
  oldest = next_due
end
if first_wait[2] and (oldest == '' or tonumber(first_wait[2]) < oldest) then
  oldest = tonumber(first_wait[2])
end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[4]), next_due, oldest,
        redis.call('ZCARD', KEYS[7]), redis.call('ZCARD', KEYS[8])}
