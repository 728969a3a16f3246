"""Pure policy: rate parsing, limiter math, keys. Standard library only, clock injected."""
