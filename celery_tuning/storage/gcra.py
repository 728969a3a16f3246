"""Where GCRA buckets live: one interface, an in-process store and a Redis (Lua) store."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple

from ..errors import ConfigurationError
from ..policy.gcra import (
    GcraResult,
    GcraState,
    adaptive_interval,
    gcra_acquire,
    gcra_pause,
    gcra_tokens,
    recovered_factor,
)
from .keys import rate_limit_bucket_key, rate_limit_conf_key
from .redis import RedisConnector

__all__ = ["MAX_DEBT_US", "AdaptiveSpec", "Bucket", "GcraManyResult", "GcraSnapshot", "GcraStore", "MemoryGcraStore",
           "RedisGcraStore", "StackedBucket", "gcra_charge", "now_us"]

#: Furthest (µs) a charge moves a bucket's next admission past now: a year. Bounds a runaway
#: ``charge(n)`` (and the key's TTL, which always outlives the debt).
MAX_DEBT_US = 366 * 86_400 * 1_000_000


def now_us() -> int:
    """Wall clock in integer microseconds (the memory store's default clock)."""
    return time.time_ns() // 1000


def gcra_charge(state: Optional[GcraState], now: int, interval: int, burst: int, n: int,
                max_debt: int = MAX_DEBT_US) -> GcraState:
    """State after debiting ``n`` tokens at ``now`` without waiting or refusing (``gcra_charge.lua``).

    The move of an admitted acquire of cost ``n`` (``allow_at`` on by ``n`` intervals from the
    bucket's level now) without its admission check: what it takes beyond the tokens the bucket
    holds is debt, which later acquires wait out. ``allow_at`` never moves past ``now + max_debt``.
    """
    base = now - (burst - 1) * interval
    if state is not None and state.full_at > now and state.allow_at > base:
        base = state.allow_at
    allow_at = base + n * interval
    if allow_at > now + max_debt:
        allow_at = max(base, now + max_debt)
    return GcraState(allow_at, allow_at + (burst - 1) * interval)


@dataclass(frozen=True)
class Bucket:
    """Keys of one bucket; ``conf`` is shared by every bucket of a limiter (same hash tag)."""

    tat: str
    conf: str

    @classmethod
    def for_limiter(cls, prefix: str, name: str, key_hash: Optional[str] = None) -> Bucket:
        return cls(tat=rate_limit_bucket_key(prefix, name, key_hash), conf=rate_limit_conf_key(prefix, name))


class StackedBucket(NamedTuple):
    """One bucket of a decision over several (:meth:`GcraStore.acquire_many`): the bucket, its
    limiter's configured interval (µs) and burst, and the tokens this call takes from it (>= 1)."""

    bucket: Bucket
    interval: int
    burst: int
    cost: int


class GcraManyResult(NamedTuple):
    """Outcome of one decision over several buckets (``gcra_acquire_many.lua``)."""

    #: True when every bucket admits (now, or with slots reserved ``wait_us`` ahead): tokens were
    #: taken from each. False: nothing was taken from any.
    allowed: bool
    #: The longest of the buckets' waits (µs): 0 admitted now; allowed: the call's slot (the latest
    #: of its buckets' slots); refused: when every bucket would admit it.
    wait_us: int
    #: Index (0-based) of the bucket with that longest wait, the first of equals.
    which: int


def _check_stack(entries: Sequence[StackedBucket]) -> None:
    if not entries:
        raise ConfigurationError("acquire_many(entries=[]): expected at least one bucket")
    seen = set()
    for entry in entries:
        if entry.bucket.tat in seen:
            raise ConfigurationError(
                f"acquire_many(entries=...): bucket {entry.bucket.tat!r} appears twice; a stack takes "
                "each bucket once")
        seen.add(entry.bucket.tat)


@dataclass(frozen=True)
class AdaptiveSpec:
    """Multiplicative decrease on throttling, linear recovery."""

    decrease: float = 0.5
    min_factor: float = 0.05
    #: Seconds for the factor to climb from 0 back to 1.
    recovery_seconds: float = 60.0

    @property
    def recover_per_us(self) -> float:
        return 1.0 / (self.recovery_seconds * 1_000_000)


@dataclass(frozen=True)
class GcraSnapshot:
    """A bucket as its store sees it now (read-only: taking it changes nothing)."""

    #: Emission interval in force (µs), after the run-time override and the adaptive factor.
    interval: int
    #: Bucket capacity in force.
    burst: int
    #: Adaptive factor now (None: not slowed, or fully recovered).
    factor: Optional[float]
    #: Whole tokens available now.
    tokens: int
    #: True when ``tuning limit set`` overrode the interval or the burst.
    overridden: bool

    @property
    def rate_per_second(self) -> float:
        return 1_000_000 / self.interval


class GcraStore(Protocol):
    """State behind a GCRA limiter."""

    def acquire(self, bucket: Bucket, interval: int, burst: int, cost: int, reserve: int,
                now: Optional[int] = None) -> GcraResult: ...

    def acquire_many(self, entries: Sequence[StackedBucket], reserve: int,
                     now: Optional[int] = None) -> GcraManyResult: ...

    def pause(self, bucket: Bucket, interval: int, burst: int, pause: int,
              adaptive: Optional[AdaptiveSpec] = None, now: Optional[int] = None) -> None: ...

    def charge(self, bucket: Bucket, interval: int, burst: int, n: int, now: Optional[int] = None) -> int: ...

    def set_override(self, bucket: Bucket, interval: Optional[int], burst: Optional[int]) -> None: ...

    def get_override(self, bucket: Bucket) -> Dict[str, float]: ...

    def snapshot(self, bucket: Bucket, interval: int, burst: int, now: Optional[int] = None) -> GcraSnapshot: ...

    def reset(self, bucket: Bucket, *, override: bool = True) -> None: ...


class MemoryGcraStore:
    """Buckets in this process only: the local fallback and the reference for the contract tests.

    Arguments:
        clock: Returns now in integer microseconds (inject a manual clock in tests).
    """

    def __init__(self, clock: Callable[[], int] = now_us) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._state: Dict[str, GcraState] = {}
        self._conf: Dict[str, Dict[str, float]] = {}

    def _rate(self, bucket: Bucket, interval: int, burst: int, at: int) -> Tuple[int, int]:
        """Interval and burst at ``at``: ``gcra_rate.lua``'s arithmetic."""
        conf = self._conf.get(bucket.conf, {})
        interval = int(conf.get("interval", interval))
        burst = int(conf.get("burst", burst))
        if "factor" in conf:
            interval = adaptive_interval(interval, conf["factor"], int(conf["factor_at"]), conf["recover"], at)
        return interval, burst

    def _get(self, key: str, now: int) -> Optional[GcraState]:
        state = self._state.get(key)
        if state is not None and state.full_at <= now:
            # full again: what a Redis key's expiry would drop (decisions read it as full either way)
            del self._state[key]
            return None
        return state

    def acquire(self, bucket: Bucket, interval: int, burst: int, cost: int, reserve: int,
                now: Optional[int] = None) -> GcraResult:
        with self._lock:
            now = self.clock() if now is None else now
            conf = self._conf.get(bucket.conf)
            if conf and "factor" in conf and recovered_factor(
                    conf["factor"], int(conf["factor_at"]), conf["recover"], now) >= 1:
                # gcra_acquire.lua forgets a recovered factor (HDEL); an override shown later agrees
                for field in ("factor", "factor_at", "recover"):
                    del conf[field]
            interval, burst = self._rate(bucket, interval, burst, now)
            result = gcra_acquire(self._get(bucket.tat, now), now, interval, burst, cost, reserve)
            if result.new_state is not None:
                self._state[bucket.tat] = result.new_state
            return result

    def _forget_recovered_factor(self, bucket: Bucket, now: int) -> None:
        conf = self._conf.get(bucket.conf)
        if conf and "factor" in conf and recovered_factor(
                conf["factor"], int(conf["factor_at"]), conf["recover"], now) >= 1:
            for field in ("factor", "factor_at", "recover"):
                del conf[field]

    def acquire_many(self, entries: Sequence[StackedBucket], reserve: int,
                     now: Optional[int] = None) -> GcraManyResult:
        """Admit only when every bucket admits, taking tokens from all or none (``gcra_acquire_many.lua``)."""
        _check_stack(entries)
        with self._lock:
            now = self.clock() if now is None else now
            results, rates, states = [], [], []
            for entry in entries:
                self._forget_recovered_factor(entry.bucket, now)
                interval, burst = self._rate(entry.bucket, entry.interval, entry.burst, now)
                state = self._get(entry.bucket.tat, now)
                rates.append((interval, burst))
                states.append(state)
                results.append(gcra_acquire(state, now, interval, burst, entry.cost, reserve))
            longest = max(r.wait_us for r in results)
            which = next(i for i, r in enumerate(results) if r.wait_us == longest)
            if not all(r.allowed for r in results):
                return GcraManyResult(False, longest, which)
            # Every bucket is charged as of the one time the call is admitted (now + the longest wait).
            at = now + longest
            for entry, state, (interval, burst) in zip(entries, states, rates):
                admitted = gcra_acquire(state, at, interval, burst, entry.cost, 0)
                assert admitted.allowed and admitted.new_state is not None
                self._state[entry.bucket.tat] = admitted.new_state
            return GcraManyResult(True, longest, which)

    def pause(self, bucket: Bucket, interval: int, burst: int, pause: int,
              adaptive: Optional[AdaptiveSpec] = None, now: Optional[int] = None) -> None:
        with self._lock:
            now = self.clock() if now is None else now
            if adaptive is not None:
                conf = self._conf.setdefault(bucket.conf, {})
                current = 1.0
                if "factor" in conf:
                    current = min(1.0, recovered_factor(conf["factor"], int(conf["factor_at"]), conf["recover"], now))
                conf.update(factor=max(adaptive.min_factor, current * adaptive.decrease),
                            factor_at=now, recover=adaptive.recover_per_us)
            interval, burst = self._rate(bucket, interval, burst, now)
            self._state[bucket.tat] = gcra_pause(self._get(bucket.tat, now), now, interval, burst, pause)

    def charge(self, bucket: Bucket, interval: int, burst: int, n: int, now: Optional[int] = None) -> int:
        """Debit ``n`` tokens now, never waiting or refusing; the debt left in µs (``gcra_charge.lua``)."""
        with self._lock:
            now = self.clock() if now is None else now
            interval, burst = self._rate(bucket, interval, burst, now)
            state = gcra_charge(self._get(bucket.tat, now), now, interval, burst, n)
            self._state[bucket.tat] = state
            return max(0, state.allow_at - now)

    def set_override(self, bucket: Bucket, interval: Optional[int], burst: Optional[int]) -> None:
        with self._lock:
            conf = self._conf.setdefault(bucket.conf, {})
            if interval is not None:
                conf["interval"] = interval
            if burst is not None:
                conf["burst"] = burst

    def get_override(self, bucket: Bucket) -> Dict[str, float]:
        with self._lock:
            return dict(self._conf.get(bucket.conf, {}))

    def snapshot(self, bucket: Bucket, interval: int, burst: int, now: Optional[int] = None) -> GcraSnapshot:
        with self._lock:
            now = self.clock() if now is None else now
            conf = self._conf.get(bucket.conf, {})
            factor: Optional[float] = None
            if "factor" in conf:
                factor = recovered_factor(conf["factor"], int(conf["factor_at"]), conf["recover"], now)
                if factor >= 1:
                    factor = None
            interval, burst = self._rate(bucket, interval, burst, now)
            state = self._state.get(bucket.tat)  # read-only: a full bucket's state is left for acquire
            allow_at = state.allow_at if state is not None and state.full_at > now else None
            return GcraSnapshot(interval, burst, factor, gcra_tokens(allow_at, now, interval, burst),
                                "interval" in conf or "burst" in conf)

    def reset(self, bucket: Bucket, *, override: bool = True) -> None:
        with self._lock:
            if override:
                self._conf.pop(bucket.conf, None)
            self._state.pop(bucket.tat, None)


class RedisGcraStore:
    """Buckets in Redis: every decision is one ``EVALSHA`` of ``gcra_acquire.lua``.

    Raises :class:`~celery_tuning.errors.StorageError` when Redis fails; the
    limiter applies its Redis-error policy.

    Arguments:
        connector: The tuning Redis.
        clock: Now in integer microseconds, sent to the scripts when a call passes no ``now``
            (tests drive the memory and the Redis store with one manual clock). None, the
            default: the scripts read the Redis server's ``TIME``, so worker clocks never matter.
    """

    def __init__(self, connector: RedisConnector, clock: Optional[Callable[[], int]] = None) -> None:
        self.connector = connector
        self.clock = clock

    @staticmethod
    def script_args(bucket: Bucket, interval: int, burst: int, cost: int, reserve: int) -> Tuple[List[str], str]:
        """``gcra_acquire.lua``'s KEYS and packed ARGV[1] (also run inside ``cache_lookup_acquire.lua``)."""
        return [bucket.tat, bucket.conf], f"{interval} {burst} {cost} {reserve}"

    def acquire(self, bucket: Bucket, interval: int, burst: int, cost: int, reserve: int,
                now: Optional[int] = None) -> GcraResult:
        keys, packed = self.script_args(bucket, interval, burst, cost, reserve)
        if now is None and self.clock is not None:
            now = self.clock()
        args = [packed] if now is None else [packed, now]
        r = int(self.connector.evalsha("gcra_acquire", keys=keys, args=args))
        return GcraResult(r >= 0, abs(r), None)

    def acquire_many(self, entries: Sequence[StackedBucket], reserve: int,
                     now: Optional[int] = None) -> GcraManyResult:
        """One ``EVALSHA`` of ``gcra_acquire_many.lua``: every bucket admits and pays, or none pays.

        Raises:
            ConfigurationError: On Redis Cluster when the buckets' keys live in more than one slot
                (buckets of different limiters do: each limiter's name is its hash tag).
        """
        _check_stack(entries)
        keys: List[str] = []
        packed = [str(reserve)]
        for entry in entries:
            keys += [entry.bucket.tat, entry.bucket.conf]
            packed.append(f"{entry.interval} {entry.burst} {entry.cost}")
        if self.connector.target.kind == "cluster":
            from redis.crc import key_slot

            if len({key_slot(k.encode()) for k in keys}) > 1:
                raise ConfigurationError(
                    "stacked rate limits: on Redis Cluster the buckets of one decision must share a slot, "
                    f"and {[e.bucket.tat for e in entries]} do not (each limiter's name is its hash tag)")
        if now is None and self.clock is not None:
            now = self.clock()
        args: List[Any] = [" ".join(packed)] if now is None else [" ".join(packed), now]
        r, which = self.connector.evalsha("gcra_acquire_many", keys=keys, args=args)
        r = int(r)
        return GcraManyResult(r >= 0, abs(r), int(which) - 1)

    def pause(self, bucket: Bucket, interval: int, burst: int, pause: int,
              adaptive: Optional[AdaptiveSpec] = None, now: Optional[int] = None) -> None:
        args: List[Any] = [interval, burst, pause]
        if adaptive is None:
            args += ["", "", ""]
        else:
            args += [repr(adaptive.decrease), repr(adaptive.min_factor), repr(adaptive.recover_per_us)]
        if now is None and self.clock is not None:
            now = self.clock()
        args.append("" if now is None else now)
        self.connector.evalsha("gcra_pause", keys=[bucket.tat, bucket.conf], args=args)

    def charge(self, bucket: Bucket, interval: int, burst: int, n: int, now: Optional[int] = None) -> int:
        """One ``EVALSHA`` of ``gcra_charge.lua``: debit ``n`` tokens now; the debt left in µs."""
        if now is None and self.clock is not None:
            now = self.clock()
        return int(self.connector.evalsha("gcra_charge", keys=[bucket.tat, bucket.conf],
                                          args=[interval, burst, n, MAX_DEBT_US, "" if now is None else now]))

    def snapshot(self, bucket: Bucket, interval: int, burst: int, now: Optional[int] = None) -> GcraSnapshot:
        if now is None and self.clock is not None:
            now = self.clock()
        raw = self.connector.evalsha("gcra_snapshot", keys=[bucket.tat, bucket.conf],
                                     args=[interval, burst, "" if now is None else now])
        interval, burst, factor, allow_at, at, overridden = raw
        allow_at = int(allow_at) if allow_at else None  # Lua's false arrives as None
        return GcraSnapshot(int(interval), int(burst), float(factor) if factor else None,
                            gcra_tokens(allow_at, int(at), int(interval), int(burst)), bool(overridden))

    def set_override(self, bucket: Bucket, interval: Optional[int], burst: Optional[int]) -> None:
        mapping = {k: v for k, v in (("interval", interval), ("burst", burst)) if v is not None}
        if mapping:
            self.connector.run(lambda c: c.hset(bucket.conf, mapping=mapping), what="HSET override")

    def get_override(self, bucket: Bucket) -> Dict[str, float]:
        raw = self.connector.run(lambda c: c.hgetall(bucket.conf), what="HGETALL override")
        out: Dict[str, float] = {}
        for k, v in raw.items():
            try:
                out[k.decode() if isinstance(k, bytes) else str(k)] = float(v)
            except (TypeError, ValueError):
                continue  # foreign value: ignore rather than crash
        return out

    def reset(self, bucket: Bucket, *, override: bool = True) -> None:
        keys = (bucket.conf, bucket.tat) if override else (bucket.tat,)
        self.connector.run(lambda c: c.delete(*keys), what="DEL limiter")
