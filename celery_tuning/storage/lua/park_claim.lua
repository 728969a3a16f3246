-- park_claim.lua: a mover takes due entries to publish them.
--
-- KEYS     one spot's keys (see park_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  batch (most entries claimed)   ARGV[4]  claim TTL (µs)
-- ARGV[5]  most expired claims put back in this call
-- Returns: a flat array id, payload, pub, id, payload, pub, ... oldest due first.
-- Touches: the spot's keys; expiries refreshed when anything moved; an empty caller key's spot
-- leaves its limit's key index (park_unindex).
-- First, claims that expired (their mover died) go back to due with score now: nothing is lost.
-- Then up to ARGV[3] entries due by now are claimed until now + claim TTL and their ticket's pub
-- goes up by one. An entry whose payload is gone is dropped; so is one whose ticket says it ran.
-- Mirrors celery_tuning.storage.park.MemoryParkStore.claim.
--@include server_clock
--@include park_trim
--@include park_touch
--@include park_unindex
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local nowf = string.format('%.0f', now)
park_trim(KEYS, {now})
local expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', nowf, 'LIMIT', 0, tonumber(ARGV[5]))
for _, id in ipairs(expired) do
  redis.call('ZREM', KEYS[4], id)
  redis.call('ZADD', KEYS[1], nowf, id)
end
local out = {}
local batch = tonumber(ARGV[3])
local ready = {}
if batch > 0 then
  ready = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', nowf, 'LIMIT', 0, batch)
  local until_ = string.format('%.0f', now + tonumber(ARGV[4]))
  for _, id in ipairs(ready) do
    redis.call('ZREM', KEYS[1], id)
    local payload = redis.call('HGET', KEYS[3], id)
    if payload then
      local ticket = redis.call('HGET', KEYS[5], id)
      if ticket and string.sub(ticket, -2) == ':r' then
        redis.call('HDEL', KEYS[3], id)
      else
        local pub = 1
        if ticket then
          pub = tonumber(string.match(ticket, '^%d+')) + 1
        end
        redis.call('HSET', KEYS[5], id, string.format('%d', pub))
        redis.call('ZADD', KEYS[6], string.format('%.0f', now + ttl), id)
        redis.call('ZADD', KEYS[4], until_, id)
        out[#out + 1] = id
        out[#out + 1] = payload
        out[#out + 1] = pub
      end
    end
  end
end
if #expired > 0 or #ready > 0 then
  park_touch(KEYS, {now, ttl})
end
-- Also when nothing moved: a listed caller key's spot whose keys expired leaves the index here.
park_unindex(KEYS, {})
return out
