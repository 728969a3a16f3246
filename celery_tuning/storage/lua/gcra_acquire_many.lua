-- gcra_acquire_many.lua: one decision over several GCRA buckets (a task's stacked @rate_limit),
-- atomically, on the Redis server's clock: admitted only when every bucket admits, and then the
-- tokens are taken from every bucket; refused, nothing is written (a refused call spends no bucket).
--
-- KEYS     two per bucket, in order: KEYS[2i-1] bucket key ("allow_at full_at", integer µs),
--          KEYS[2i] its limiter's override hash (same hash tag as the bucket). On Redis Cluster
--          every key must live in one slot (RedisGcraStore.acquire_many refuses otherwise).
-- ARGV[1]  "reserve interval burst cost interval burst cost ..." in one space-separated string:
--            reserve:  largest wait (µs) for which future slots are taken; -1 never (all buckets)
--            then per bucket, in KEYS order: interval (µs), burst (>= 1), cost (tokens, >= 1)
-- ARGV[2]  optional now override in µs (absent or '': the server's TIME; tests pass a fixed clock)
-- Returns: {r, i}: r = 0 admitted now; r > 0 every bucket's slot reserved, the call's slot r µs
--          ahead (the latest of them); r < 0 refused, every bucket admits in -r µs (the longest
--          wait). i: the 1-based bucket with that longest wait (the first of equals).
-- Touches: per bucket, KEYS[2i-1] only when every bucket admits (SET with PX: expires a second
--          after full_at); KEYS[2i] as gcra_acquire.lua does (a recovered adaptive factor is
--          forgotten, HDEL, which changes no decision).
-- Units:   microseconds.
-- Mirrors MemoryGcraStore.acquire_many (each bucket is celery_tuning.policy.gcra.gcra_acquire;
-- the contract and differential tests compare both). A bucket must not appear twice.
--@include server_clock
--@include gcra_state
--@include gcra_rate
local fields = {}
for word in string.gmatch(ARGV[1], '%S+') do fields[#fields + 1] = tonumber(word) end
local n = #KEYS / 2
if n < 1 or #KEYS % 2 ~= 0 or #fields ~= 1 + 3 * n then
  return redis.error_reply('gcra_acquire_many: ARGV[1] must be "reserve" then "interval burst cost" per bucket')
end
local reserve = fields[1]
local now = server_clock({}, {ARGV[2]})
local longest, longest_at, refused = nil, 1, false
local writes = {}
for i = 1, n do
  local tat, conf = KEYS[2 * i - 1], KEYS[2 * i]
  local cost = fields[3 * i + 1]
  local interval, burst, factor = gcra_rate({conf}, {fields[3 * i - 1], fields[3 * i], now})
  if factor and factor >= 1 then
    redis.call('HDEL', conf, 'factor', 'factor_at', 'recover')
  end
  local base = now - (burst - 1) * interval
  local allow_at = gcra_state({tat}, {now})
  if allow_at and allow_at > base then base = allow_at end
  local need = cost
  if need > burst then need = burst end
  local wait = base + (need - 1) * interval - now
  if wait > 0 and reserve < wait then refused = true end
  if wait < 0 then wait = 0 end
  if longest == nil or wait > longest then longest, longest_at = wait, i end
  writes[i] = {allow_at or false, interval, burst, cost}
end
if refused then return {-longest, longest_at} end
-- Every bucket is charged as of the one time the call is admitted, now + the longest wait: a
-- bucket that would admit sooner must not count the call as run sooner (it would admit the next
-- call of its key too early: two runs of a 10/s tenant 50 ms apart behind a slower shared limit).
local at = now + longest
for i = 1, n do
  local interval, burst, cost = writes[i][2], writes[i][3], writes[i][4]
  -- The bucket as it stands at `at`: one full by then (full_at <= at) counts as idle, as a call
  -- decided at `at` would see it (after a rate change the stored full_at is not allow_at + the
  -- burst at today's interval, so this is not the same as comparing with base below).
  local prev = gcra_state({KEYS[2 * i - 1]}, {at})
  local base = at - (burst - 1) * interval
  if prev and prev > base then base = prev end
  local allow_at = base + cost * interval
  local full_at = allow_at + (burst - 1) * interval
  redis.call('SET', KEYS[2 * i - 1], string.format('%.0f %.0f', allow_at, full_at),
             'PX', math.ceil((full_at - now) / 1000) + 1000)
end
return {longest, longest_at}
