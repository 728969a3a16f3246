-- park_index_keep.lua: keep the park index alive while movers read it.
--
-- KEYS[1]  the index set, e.g. tuning:park:index
-- ARGV[1]  how long the index must live at least from now (µs): the ticket TTL
-- Returns: 1.
-- Touches: KEYS[1]'s expiry, only ever lengthened (as park_index.lua does). Without it, an index
-- written by the last park would expire under concurrency waiters that wait longer than that,
-- and the movers would stop seeing their spot.
local ms = math.ceil(tonumber(ARGV[1]) / 1000) + 1000
if redis.call('EXISTS', KEYS[1]) == 1 and redis.call('PTTL', KEYS[1]) < ms then
  redis.call('PEXPIRE', KEYS[1], ms)
end
return 1
