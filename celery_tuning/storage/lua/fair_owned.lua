-- fair_owned.lua: whether the claim `pub` still owns message `id` (its ticket is at that pub, not
-- run, and the message is claimed). Not run alone: included ("--@include fair_owned") by
-- fair_ack.lua and fair_reject.lua, which act only for the claim that owns the message.
--
-- KEYS     one queue's fair keys (see fair_add.lua)
-- ARGV[1]  message id   ARGV[2]  the pub it was claimed with
-- Returns: true when it owns it.
-- Mirrors celery_tuning.storage.fair._QueueState.owned.
local ticket = redis.call('HGET', KEYS[6], ARGV[1])
if not ticket or string.sub(ticket, -2) == ':r' or tonumber(string.match(ticket, '^%d+')) ~= tonumber(ARGV[2]) then
  return false
end
return redis.call('ZSCORE', KEYS[4], ARGV[1]) ~= false
