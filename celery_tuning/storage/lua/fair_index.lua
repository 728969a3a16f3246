-- fair_index.lua: list a queue in the fair index (Redis Cluster: the index has its own slot, so
-- this runs before fair_add.lua, which then leaves the index alone).
--
-- KEYS[1]  the index set (storage/keys.py fair_index_key)
-- ARGV[1]  ticket TTL (µs)   ARGV[2]  the queue name
-- Returns: 1.   Touches: KEYS[1] (its expiry refreshed to outlive the queue's keys).
redis.call('SADD', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
return 1
