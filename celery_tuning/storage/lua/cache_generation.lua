-- cache_generation.lua: the generation of a task's cache, created when missing; optionally bumped.
--
-- KEYS[1]  generation key, e.g. tuning:cache:{proj.tasks.embed}:gen
-- ARGV[1]  '1': bump it (clear()), '0': only read it
-- Returns: the generation (integer).
-- A missing key starts at the server's TIME in microseconds, not at 0: a key evicted under an
-- allkeys-* policy (or lost in a restart) must not bring a cleared generation back, and every
-- generation ever counted up from an earlier start lies below a later TIME (one clock: Redis's,
-- read through server_clock.lua like every other script that keeps time; no override here).
--@include server_clock
local g = tonumber(redis.call('GET', KEYS[1]) or '')
if not g then
  g = server_clock({}, {})
  redis.call('SET', KEYS[1], string.format('%d', g))
end
if ARGV[1] == '1' then
  return redis.call('INCR', KEYS[1])
end
return g
