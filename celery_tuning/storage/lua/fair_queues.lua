-- fair_queues.lua: the queues of the fair index; a dispatcher that saw calls waiting keeps it.
--
-- KEYS[1]  the index set (storage/keys.py fair_index_key)
-- ARGV[1]  ticket TTL (µs): the index's expiry is refreshed to outlive the queues' keys; '' leaves it
-- Returns: the index's members (queue names).
-- Touches: KEYS[1] (its expiry, with ARGV[1]). Producers list a queue in the index when they add
-- (fair_add.lua, fair_index.lua); a dispatcher keeps it while calls wait, so a backlog that drains
-- for longer than the ticket TTL with no new call is not forgotten.
if ARGV[1] ~= '' then
  redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
end
return redis.call('SMEMBERS', KEYS[1])
