-- breaker.lua: every state change of a shared circuit breaker, atomically, on server time.
--
-- KEYS[1]  breaker hash, e.g. tuning:cb:{payments}
--          fields: state ('closed'|'open'|'half-open'), failures, successes,
--                  opened_at (µs), trial_until (µs: half-open trial lease),
--                  trial_token (who holds the trial; '' when no one), version
-- ARGV[1]  op: 'status' | 'failure' | 'success' | 'trial' | 'release' | 'open' | 'half-open' |
--          'close' | 'reset'
-- ARGV[2]  reset_timeout (µs)      ARGV[3]  fail_max
-- ARGV[4]  success_threshold       ARGV[5]  trial lease (µs)
-- ARGV[6]  trial token: for 'trial' the caller's fresh random id (stored when granted); for
--          'success' | 'failure' | 'release' the id the caller was granted, '' when it runs no
--          trial. Only the current holder's verdict settles the trial, and only once.
-- ARGV[7]  channel a 'failure' is published on (the breaker key as the message), '' for none
-- ARGV[8]  optional now override in µs (absent or '': the server's TIME, read by server_clock.lua)
-- Returns: {state, failures, remaining_us, version, granted (1|0)}
--          remaining_us: open -> until the reset timeout elapses; half-open -> until the
--          trial lease expires; closed -> 0. granted: 'trial' only, the caller runs the trial.
-- Mirrors celery_tuning.policy.breaker (the reference state machine MemoryBreakerStore drives;
-- one contract test suite and a differential state-machine test run both).
--@include server_clock
local op = ARGV[1]
local reset_timeout = tonumber(ARGV[2])
local fail_max = tonumber(ARGV[3])
local success_threshold = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local token = ARGV[6]
local channel = ARGV[7]
local now = server_clock({}, {ARGV[8]})

if op == 'reset' then
  redis.call('DEL', KEYS[1])
  return {'closed', 0, 0, 0, 0}
end

local h = redis.call('HMGET', KEYS[1], 'state', 'failures', 'successes', 'opened_at', 'trial_until',
                     'version', 'trial_token')
local state = h[1] or 'closed'
local failures = tonumber(h[2]) or 0
local successes = tonumber(h[3]) or 0
local opened_at = tonumber(h[4]) or 0
local trial_until = tonumber(h[5]) or 0
local version = tonumber(h[6]) or 0
local holder = h[7] or ''
local granted = 0
-- An expired lease still settles when no one took the trial over (the token is unchanged);
-- once another caller holds it, the late verdict is ignored.
local holds_trial = state == 'half-open' and token ~= '' and token == holder

local function go(new_state)
  state = new_state
  version = version + 1
end

if op == 'failure' then
  failures = failures + 1
  if state == 'closed' and failures >= fail_max then
    go('open'); opened_at = now
  elseif holds_trial then
    go('open'); opened_at = now; trial_until = 0; successes = 0; holder = ''
  end
elseif op == 'success' then
  if state == 'closed' then
    failures = 0
  elseif holds_trial then
    successes = successes + 1
    trial_until = 0; holder = ''
    if successes >= success_threshold then
      go('closed'); failures = 0; successes = 0
    end
  end
elseif op == 'trial' then
  if state == 'open' and now >= opened_at + reset_timeout then
    go('half-open'); successes = 0; trial_until = now + lease; holder = token; granted = 1
  elseif state == 'half-open' and trial_until <= now then
    -- no trial running (the last one finished, or its worker died and the lease ran out)
    trial_until = now + lease; holder = token; granted = 1
  end
elseif op == 'release' then
  -- the trial ended without a verdict (control flow such as a deferral): let another run it
  if holds_trial then trial_until = 0; holder = '' end
elseif op == 'half-open' then
  if state ~= 'half-open' then go('half-open') end
  successes = 0; trial_until = 0; holder = ''
elseif op == 'open' then
  if state ~= 'open' then go('open') end
  opened_at = now; trial_until = 0; successes = 0; holder = ''
elseif op == 'close' then
  if state ~= 'closed' then go('closed') end
  failures = 0; successes = 0; trial_until = 0; holder = ''
end

if op ~= 'status' then
  redis.call('HSET', KEYS[1], 'state', state, 'failures', failures, 'successes', successes,
             'opened_at', string.format('%.0f', opened_at), 'trial_until', string.format('%.0f', trial_until),
             'version', version, 'trial_token', holder)
end
if op == 'failure' and channel ~= '' then
  -- other processes' cached views may still show no failures: they reset the count on their
  -- next success (see SharedBreaker.record_success)
  redis.call('PUBLISH', channel, KEYS[1])
end

local remaining = 0
if state == 'open' then
  remaining = math.max(0, opened_at + reset_timeout - now)
elseif state == 'half-open' then
  remaining = math.max(0, trial_until - now)
end
return {state, failures, remaining, version, granted}
