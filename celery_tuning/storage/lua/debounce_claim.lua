-- debounce_claim.lua: a mover takes the debounced runs that are due, to publish them.
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  batch (most keys looked at)   ARGV[4]  claim TTL (µs)
-- Returns: a flat array digest, id, payload, pub, digest, id, payload, pub, ... (earliest look first).
-- Touches: the task's keys; expiries extended when any key was looked at.
-- For each key whose look-again time has come (at most ARGV[3]):
--   * an in-flight run published or running whose mark expired (its worker died, or its message
--     never arrived) is forgotten: the key is free again;
--   * a claim that expired (its mover died) is claimed again with the ticket's pub + 1: nothing is
--     lost, and a copy the dead mover published is a stale duplicate the worker drops;
--   * a live in-flight run holds the key: looked at again when it expires;
--   * else a pending run that is due becomes the in-flight run, claimed until now + claim TTL
--     under its ticket's pub + 1; one not due yet is looked at when it is; a key with nothing
--     left leaves the due set.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.claim.
--@include server_clock
--@include debounce_trim
--@include debounce_touch
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local batch = tonumber(ARGV[3])
local claim_until = now + tonumber(ARGV[4])
local until_ = string.format('%.0f', claim_until)
debounce_trim(KEYS, {now})
local function next_pub(id)
  local ticket = redis.call('HGET', KEYS[3], id)
  local pub = 1
  if ticket then
    pub = tonumber(string.match(ticket, '^%d+')) + 1
  end
  redis.call('HSET', KEYS[3], id, string.format('%d', pub))
  redis.call('ZADD', KEYS[4], string.format('%.0f', now + ttl), id)
  return pub
end
local out = {}
local ready = {}
if batch > 0 then
  ready = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, batch)
end
for _, d in ipairs(ready) do
  local f = redis.call('HMGET', KEYS[2], d .. ':i', d .. ':s', d .. ':x', d .. ':b', d .. ':p', d .. ':t')
  local i, s, x, b, p, t = f[1], f[2], tonumber(f[3]), f[4], f[5], tonumber(f[6])
  if i and (x == nil or x <= now) and (s ~= 'c' or not b) then
    redis.call('HDEL', KEYS[2], d .. ':i', d .. ':b', d .. ':s', d .. ':x', d .. ':n')
    i = false
  end
  if i and (x == nil or x <= now) then
    local pub = next_pub(i)
    redis.call('HSET', KEYS[2], d .. ':n', string.format('%d', pub), d .. ':x', until_)
    redis.call('ZADD', KEYS[1], until_, d)
    out[#out + 1] = d
    out[#out + 1] = i
    out[#out + 1] = b
    out[#out + 1] = pub
  elseif i then
    redis.call('ZADD', KEYS[1], string.format('%.0f', x), d)
  elseif p and t and t <= now then
    local m = redis.call('HGET', KEYS[2], d .. ':m')
    redis.call('HDEL', KEYS[2], d .. ':p', d .. ':m', d .. ':f', d .. ':t')
    if m then
      local pub = next_pub(p)
      redis.call('HSET', KEYS[2], d .. ':i', p, d .. ':b', m, d .. ':s', 'c', d .. ':x', until_,
                 d .. ':n', string.format('%d', pub))
      redis.call('ZADD', KEYS[1], until_, d)
      out[#out + 1] = d
      out[#out + 1] = p
      out[#out + 1] = m
      out[#out + 1] = pub
    else
      redis.call('ZREM', KEYS[1], d)
    end
  elseif p and t then
    redis.call('ZADD', KEYS[1], string.format('%.0f', t), d)
  else
    redis.call('HDEL', KEYS[2], d .. ':p', d .. ':m', d .. ':f', d .. ':t')
    redis.call('ZREM', KEYS[1], d)
  end
end
if #ready > 0 then
  debounce_touch(KEYS, {now, ttl, claim_until})
end
return out
