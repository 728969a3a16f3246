-- park_index.lua: note that a spot may hold parked entries (a hint for the movers).
--
-- KEYS[1]  the index set, e.g. tuning:park:index (its own Cluster slot)
-- ARGV[1]  unused (now)   ARGV[2]  how long the index must live at least (µs)
-- ARGV[3]  the spot's member, "<r>:<name>" (see storage/keys.py)
-- Returns: 1.
-- Touches: KEYS[1] (SADD; its expiry only ever grows, so one spot's short life never cuts
-- another's). Run alone before park_add.lua on a Cluster; included in it otherwise.
redis.call('SADD', KEYS[1], ARGV[3])
local ms = math.ceil(tonumber(ARGV[2]) / 1000) + 1000
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('PEXPIRE', KEYS[1], ms)
end
return 1
