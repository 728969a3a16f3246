-- fair_release.lua: a dispatcher takes the next batch of a queue's fair messages, round-robin
-- across keys, within the queue's window, to publish them.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  now in µs, or '' for the server's TIME      ARGV[2]  ticket TTL (µs)
-- ARGV[3]  the queue's key stem (P:fq:{Q})
-- ARGV[4]  batch (most messages taken)   ARGV[5]  claim TTL (µs)   ARGV[6]  window TTL (µs)
-- ARGV[7]  this dispatcher's node name ('' none)   ARGV[8]  its capacity for the queue (0: it
--          does not consume the queue)   ARGV[9]  how long its registration lasts (µs)
-- ARGV[10] the window, or '' for the sum of the live consumers' capacities
-- ARGV[11] '1' to honour the keys' concurrency caps (reads their lease sets: single server and
--          Sentinel only), '' not to
-- Returns: {waiting, window, in use, keys waiting, then id, payload, pub, digest for each message taken}.
-- Touches: the queue's keys, capped keys' released sets; expiries refreshed when anything moved
-- or a dispatcher came by (ARGV[7]): while a dispatcher runs, none of the queue's keys expire.
-- Steps:
--   * the caller's registration as a consumer is renewed (or dropped at capacity 0), lapsed
--     registrations go; the window is ARGV[10] or the live consumers' summed capacity;
--   * released messages whose window time passed (lost on their way, a worker that died with
--     them prefetched) leave the window: a lost start never stalls the queue for good;
--   * claims that expired (their dispatcher died between claiming and acknowledging) are
--     published again with pub + 1 (a copy the dead dispatcher published is a stale duplicate the
--     worker drops), unless the ticket says the message ran;
--   * then round robin: the key at the ring's head gives up to its weight of messages (fewer at
--     its concurrency cap: live leases plus its released-not-started messages) and goes to the
--     ring's tail while its list holds more (a turn cut short by the batch or the window stays at
--     the head and goes on at the next release); until the batch or the window's room is used up, the
--     ring is empty, every key in a row was found at its cap, or as many keys as the batch were.
--     The work is O(messages taken + the batch), never O(keys).
-- Each message taken is claimed until now + claim TTL under its ticket's pub + 1, and enters the
-- window until now + window TTL (and its key's released set, for a capped key).
-- Mirrors celery_tuning.storage.fair.MemoryFairStore.release.
--@include server_clock
--@include fair_trim
--@include fair_touch
--@include fair_line
local now = server_clock({}, {ARGV[1]})
local ttl = tonumber(ARGV[2])
local stem = ARGV[3]
local batch = tonumber(ARGV[4])
local nowf = string.format('%.0f', now)
local claim_until = string.format('%.0f', now + tonumber(ARGV[5]))
local win_until = string.format('%.0f', now + tonumber(ARGV[6]))
fair_trim(KEYS, {now})
if ARGV[7] ~= '' then
  if tonumber(ARGV[8]) > 0 then
    redis.call('ZADD', KEYS[10], string.format('%.0f', now + tonumber(ARGV[9])), ARGV[7])
    redis.call('HSET', KEYS[11], ARGV[7], ARGV[8])
  else
    redis.call('ZREM', KEYS[10], ARGV[7])
    redis.call('HDEL', KEYS[11], ARGV[7])
  end
end
for _, node in ipairs(redis.call('ZRANGEBYSCORE', KEYS[10], '-inf', nowf, 'LIMIT', 0, 100)) do
  redis.call('ZREM', KEYS[10], node)
  redis.call('HDEL', KEYS[11], node)
end
local window = 0
if ARGV[10] ~= '' then
  window = tonumber(ARGV[10])
else
  for _, node in ipairs(redis.call('ZRANGE', KEYS[10], 0, -1)) do
    window = window + (tonumber(redis.call('HGET', KEYS[11], node)) or 0)
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', nowf)
local out = {}
local moved = 0
local function next_pub(id)
  local ticket = redis.call('HGET', KEYS[6], id)
  if ticket and string.sub(ticket, -2) == ':r' then
    return nil
  end
  local pub = 1
  if ticket then
    pub = tonumber(string.match(ticket, '^%d+')) + 1
  end
  redis.call('HSET', KEYS[6], id, string.format('%d', pub))
  redis.call('ZADD', KEYS[7], string.format('%.0f', now + ttl), id)
  return pub
end
local function take(id, d, capped)
  local payload = redis.call('HGET', KEYS[2], id)
  local pub = nil
  if payload then
    pub = next_pub(id)
  end
  if not pub then
    redis.call('ZREM', KEYS[4], id)
    redis.call('HDEL', KEYS[2], id)
    redis.call('HDEL', KEYS[3], id)
    return false
  end
  redis.call('ZADD', KEYS[4], claim_until, id)
  redis.call('ZADD', KEYS[5], win_until, id)
  if capped then
    local released = stem .. ':p:' .. d
    redis.call('ZADD', released, win_until, id)
    redis.call('PEXPIRE', released, math.ceil(tonumber(ARGV[6]) / 1000) + 1000)
  end
  out[#out + 1] = id
  out[#out + 1] = payload
  out[#out + 1] = pub
  out[#out + 1] = d
  return true
end
local expired = {}
if batch > 0 then
  expired = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', nowf, 'LIMIT', 0, batch)
end
for _, id in ipairs(expired) do
  local d = redis.call('HGET', KEYS[3], id) or ''
  take(id, d, d ~= '' and redis.call('HEXISTS', KEYS[9], d) == 1 and ARGV[11] == '1')
  moved = moved + 1
end
local want = math.min(batch - #expired, window - redis.call('ZCARD', KEYS[5]))
local released = 0
local at_cap = 0
local in_a_row = 0
local keys_at_start = redis.call('LLEN', KEYS[1])
while released < want do
  local d = redis.call('LPOP', KEYS[1])
  if not d then
    break
  end
  -- A turn cut short by the batch or the window goes on at the next release (the key stays at
  -- the ring's head, what it took so far in the kw field u:<digest>): weights hold whatever the window.
  local left = (tonumber(redis.call('HGET', KEYS[8], d)) or 1) - (tonumber(redis.call('HGET', KEYS[8], 'u:' .. d)) or 0)
  local turn = math.min(left, want - released)
  local cut = turn < left
  local capped = false
  if ARGV[11] == '1' then
    local c = redis.call('HGET', KEYS[9], d)
    if c then
      local sp = string.find(c, ' ', 1, true)
      local released_set = stem .. ':p:' .. d
      redis.call('ZREMRANGEBYSCORE', released_set, '-inf', nowf)
      local busy = redis.call('ZCOUNT', string.sub(c, sp + 1), '(' .. nowf, '+inf') + redis.call('ZCARD', released_set)
      local room = tonumber(string.sub(c, 1, sp - 1)) - busy
      if room < turn then
        turn, cut = room, false
      end
      capped = true
    end
  end
  local n = 0
  while n < turn do
    local id = fair_line(KEYS, {'pop', d})
    if not id then
      break
    end
    redis.call('HINCRBY', KEYS[12], 'n', -1)
    moved = moved + 1
    if take(id, d, capped) then
      n = n + 1
    end
  end
  released = released + n
  if fair_line(KEYS, {'len', d}) > 0 then
    if cut and n > 0 and n == turn then
      redis.call('LPUSH', KEYS[1], d)
      redis.call('HINCRBY', KEYS[8], 'u:' .. d, n)
    else
      redis.call('RPUSH', KEYS[1], d)
      redis.call('HDEL', KEYS[8], 'u:' .. d)
    end
  else
    redis.call('HDEL', KEYS[8], d, 'u:' .. d)
    redis.call('HDEL', KEYS[9], d)
  end
  if n == 0 then
    at_cap = at_cap + 1
    in_a_row = in_a_row + 1
    if in_a_row >= keys_at_start or at_cap >= batch then
      break
    end
  else
    in_a_row = 0
  end
end
if released > 0 then
  redis.call('HINCRBY', KEYS[12], 'r', released)
end
if moved > 0 or ARGV[7] ~= '' then
  fair_touch(KEYS, {ttl})
end
local waiting = tonumber(redis.call('HGET', KEYS[12], 'n')) or 0
local result = {waiting, window, redis.call('ZCARD', KEYS[5]), redis.call('LLEN', KEYS[1])}
for _, v in ipairs(out) do
  result[#result + 1] = v
end
return result
