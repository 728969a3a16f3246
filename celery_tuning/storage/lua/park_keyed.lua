-- park_keyed.lua: the caller-key digest of a concurrency spot of one caller key, else false.
-- Not run alone: included ("--@include park_keyed") by park_touch.lua, park_unindex.lua, park_add.lua.
--
-- KEYS     one spot's keys (see park_add.lua)   ARGV: unused
-- Returns: the digest in KEYS[1] ("...}:cc:k:<digest>:due", storage/keys.py park_stem), or false
-- for any other spot (a limit's own spot, a rate limit's, a breaker's). A name's braces are
-- escaped in its hash tag, so the first '}' after the tag is the tag's own.
-- Touches: nothing.
return string.match(KEYS[1], '}:cc:k:(%x+):due$') or false
