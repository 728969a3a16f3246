"""Where shared state lives: the Redis connection layer and Lua scripts."""
