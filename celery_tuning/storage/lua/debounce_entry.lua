-- debounce_entry.lua: one key's state, read-only (tests, diagnostics).
--
-- KEYS     one task's debounce keys (see debounce_call.lua)
-- ARGV[1]  key digest
-- Returns: {pending id, first (µs), due (µs), in-flight id, state, expiry (µs), pub, look-again (µs)}:
-- each false when absent.
-- Touches: nothing.
-- Mirrors celery_tuning.storage.debounce.MemoryDebounceStore.entry.
local d = ARGV[1]
local f = redis.call('HMGET', KEYS[2], d .. ':p', d .. ':f', d .. ':t', d .. ':i', d .. ':s', d .. ':x', d .. ':n')
f[8] = redis.call('ZSCORE', KEYS[1], d) or false
return f
