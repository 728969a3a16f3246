"""``GcraLimiter``: a named token bucket shared through a store, usable from plain Python."""

from __future__ import annotations

import logging
import numbers
import threading
import time
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

from .conf import Tier, parse_per_key, parse_tier
from .errors import ConfigurationError, RateLimited, StorageError
from .policy.gcra import interval_us
from .policy.rates import Rate
from .storage.gcra import MAX_DEBT_US, AdaptiveSpec, Bucket, GcraSnapshot, GcraStore, MemoryGcraStore, StackedBucket
from .storage.keys import key_digest

__all__ = ["Decision", "GcraLimiter", "StackDecision", "Tier", "TierLike", "decide_all", "hash_key"]

#: A key's tier as callers give it: a :class:`~celery_tuning.conf.Tier`, a rate (``"100/s"``, burst 1),
#: or ``{"rate": "100/s", "burst": 20}``; None: the key's configured tier (``per_key``), else the limiter's.
TierLike = Union[Tier, str, Rate, Mapping[str, Any], None]

logger = logging.getLogger("celery_tuning.ratelimit")

#: Observer signature: (event, limiter name, seconds). Events: acquired, waited,
#: rejected, reserved, throttled, fallback, slot_expired. Never receives bucket keys or arguments.
Observer = Callable[[str, str, float], None]

_ON_REDIS_ERROR = ("local", "allow", "deny")


def hash_key(value: Any) -> str:
    """Bounded, opaque bucket id for a per-key limiter (the raw key never reaches Redis; a key
    whose ``str()`` is not the same in every process is refused, naming ``key=``)."""
    return key_digest(value)


class Decision(NamedTuple):
    """What an acquire decided."""

    allowed: bool
    #: Seconds: 0 admitted now; > 0 and allowed: slot reserved that far ahead;
    #: not allowed: how long until it would be admitted.
    wait: float
    #: 'redis', 'local' (in-process fallback), 'allow' or 'deny' (Redis-error policies).
    source: str = "redis"

    @property
    def reserved(self) -> bool:
        return self.allowed and self.wait > 0


class GcraLimiter:
    """A token bucket (GCRA) whose state lives in a :class:`GcraStore`.

    Arguments:
        name: Limiter name (metrics and logs use it; keys are hash-tagged by it).
        rate: Admissions per period.
        burst: Bucket capacity.
        store: Shared store (normally :class:`~celery_tuning.storage.gcra.RedisGcraStore`).
        prefix: Redis key prefix.
        on_redis_error: ``'local'`` (fall back to an in-process bucket at the
            same rate), ``'allow'`` or ``'deny'``.
        adaptive: Lower the rate on :meth:`throttle` and recover slowly.
        per_key: Tiers: key value -> its rate and burst (``{"enterprise": {"rate": "100/s",
            "burst": 20}}``). A key is matched as ``str()`` of the ``key`` a call passes; other keys
            (and the shared bucket) get ``rate`` and ``burst``. A run-time :meth:`override` replaces
            every key's rate (and burst, when it sets one); the adaptive factor slows every key's.
        observer: Called with ``(event, name, seconds)`` for metrics and signals.
    """

    def __init__(
        self,
        name: str,
        rate: Rate,
        burst: int = 1,
        *,
        store: GcraStore,
        prefix: str = "tuning",
        on_redis_error: str = "local",
        adaptive: Optional[AdaptiveSpec] = None,
        per_key: Optional[Mapping[Any, Any]] = None,
        observer: Optional[Observer] = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if burst < 1:
            raise ConfigurationError(f"limiter {name!r}: burst={burst!r} must be >= 1")
        if on_redis_error not in _ON_REDIS_ERROR:
            raise ConfigurationError(
                f"limiter {name!r}: on_redis_error={on_redis_error!r}; expected one of {_ON_REDIS_ERROR}")
        self.name = name
        self.rate = rate
        self.burst = int(burst)
        self.interval = interval_us(rate.period, rate.amount)
        self.store = store
        self.prefix = prefix
        self.on_redis_error = on_redis_error
        self.adaptive = adaptive
        self.observer = observer
        self.sleep = sleep
        self._fallback = MemoryGcraStore()
        self._shared_bucket = Bucket.for_limiter(prefix, name)
        self.per_key: Dict[str, Tier] = parse_per_key(f"limiter {name!r}: per_key", per_key or {})
        self.default_tier = Tier(rate, self.burst)
        self._intervals: Dict[Tier, int] = {}
        self._warned = False
        self._warn_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<GcraLimiter {self.name!r} {self.rate} burst={self.burst}>"

    def bucket(self, key: Any = None) -> Bucket:
        if key is None:
            return self._shared_bucket
        return Bucket.for_limiter(self.prefix, self.name, hash_key(key))

    def tier(self, key: Any = None, tier: TierLike = None) -> Tier:
        """The rate and burst of ``key``'s bucket: ``tier`` when given (validated, errors name
        ``tier``), else the key's entry of ``per_key`` (matched as ``str(key)``), else the limiter's."""
        if tier is not None:
            if isinstance(tier, Tier):
                return tier
            return parse_tier(f"limiter {self.name!r}: tier", tier)
        if key is not None and self.per_key:
            found = self.per_key.get(str(key))
            if found is not None:
                return found
        return self.default_tier

    def _params(self, key: Any = None, tier: TierLike = None) -> Tuple[int, int]:
        """Interval (µs) and burst sent to the store for ``key``'s bucket (before any run-time
        override, which the store applies)."""
        found = self.tier(key, tier)
        if found is self.default_tier:
            return self.interval, self.burst
        interval = self._intervals.get(found)
        if interval is None:
            interval = self._intervals[found] = interval_us(found.rate.period, found.rate.amount)
        return interval, found.burst

    def _emit(self, event: str, seconds: float = 0.0) -> None:
        if self.observer is not None:
            try:
                self.observer(event, self.name, seconds)
            except Exception:
                logger.exception("rate-limit observer failed")

    def _storage_failed(self, exc: StorageError) -> None:
        with self._warn_lock:
            first, self._warned = not self._warned, True
        if first:
            logger.warning("limiter %r: tuning Redis failed (%s); applying on_redis_error=%r until it is back",
                           self.name, exc, self.on_redis_error)
        self._emit("fallback")

    @staticmethod
    def _valid_cost(cost: Any) -> bool:
        return isinstance(cost, numbers.Integral) and not isinstance(cost, bool) and int(cost) >= 1

    def _check_cost(self, cost: Any) -> None:
        if not self._valid_cost(cost):
            raise ConfigurationError(f"limiter {self.name!r}: cost={cost!r}: expected an integer >= 1")

    @staticmethod
    def _bounded(cost: int, interval: int, burst: int) -> int:
        """``cost``, or the cost of a year of debt when it is more (as :meth:`charge` bounds it):
        past that the scripts' arithmetic loses precision, then fails, and the stores disagree."""
        return min(cost, burst + MAX_DEBT_US // max(1, interval))

    @staticmethod
    def _reserve_us(reserve: Optional[float]) -> int:
        return -1 if reserve is None else int(reserve * 1_000_000)

    def _redis_answered(self) -> None:
        if self._warned:
            with self._warn_lock:
                self._warned = False
            logger.info("limiter %r: tuning Redis is back", self.name)

    def _decided(self, allowed: bool, wait_us: int, source: str) -> Decision:
        decision = Decision(allowed, wait_us / 1_000_000, source)
        if not decision.allowed:
            self._emit("rejected", decision.wait)
        elif decision.wait > 0:
            self._emit("reserved", decision.wait)
        else:
            self._emit("acquired")
        return decision

    def decide(self, cost: int = 1, *, reserve: Optional[float] = None, key: Any = None,
               tier: TierLike = None) -> Decision:
        """One round trip: admit now, reserve a slot up to ``reserve`` seconds ahead, or refuse.

        A ``cost`` above the burst is admitted once the bucket is full (it could never be
        otherwise), and the part above the burst is debt that delays the calls after it (at most
        a year of it, as :meth:`charge`).

        ``tier``: the rate and burst of ``key``'s bucket (see :meth:`tier`; default: ``per_key``).

        Never raises because Redis is down: the Redis-error policy answers instead.
        """
        self._check_cost(cost)
        cost = int(cost)
        reserve_us = self._reserve_us(reserve)
        bucket = self.bucket(key)
        interval, burst = self._params(key, tier)
        cost = self._bounded(cost, interval, burst)
        try:
            result = self.store.acquire(bucket, interval, burst, cost, reserve_us)
            source = "redis"
            self._redis_answered()
        except StorageError as exc:
            self._storage_failed(exc)
            if self.on_redis_error == "allow":
                return Decision(True, 0.0, "allow")
            if self.on_redis_error == "deny":
                return Decision(False, max(1.0, interval / 1_000_000), "deny")
            result = self._fallback.acquire(bucket, interval, burst, cost, reserve_us)
            source = "local"
        return self._decided(result.allowed, result.wait_us, source)

    def plan(self, cost: int = 1, *, reserve: Optional[float] = None,
             key: Any = None, tier: TierLike = None) -> Optional[Tuple[List[str], str]]:
        """``gcra_acquire.lua``'s KEYS and ARGV[1] for the decision :meth:`decide` would make.

        Lets another script (the cache's miss path) take the decision in its own round trip;
        hand its reply to :meth:`settle`. None when the store is not Redis or ``cost`` is
        invalid (then call :meth:`decide`, which applies every policy and raises as usual).
        """
        script_args = getattr(self.store, "script_args", None)
        if script_args is None or not self._valid_cost(cost):
            return None
        interval, burst = self._params(key, tier)
        return script_args(self.bucket(key), interval, burst, self._bounded(int(cost), interval, burst),
                           self._reserve_us(reserve))

    def settle(self, reply: int) -> Decision:
        """The :class:`Decision` for a ``gcra_acquire.lua`` reply obtained through :meth:`plan`."""
        self._redis_answered()
        return self._decided(reply >= 0, abs(reply), "redis")

    def try_acquire(self, cost: int = 1, key: Any = None, *, tier: TierLike = None) -> bool:
        """Take ``cost`` tokens if they are there now; never waits."""
        return self.decide(cost, key=key, tier=tier).allowed

    def acquire(self, timeout: Optional[float] = None, cost: int = 1, key: Any = None,
                *, decision: Optional[Decision] = None, tier: TierLike = None) -> float:
        """Block until admitted, at most ``timeout`` seconds (None: wait as long as it takes).

        The slot is reserved in the same round trip, so waiting callers are
        spaced at the rate instead of retrying in a herd.

        ``decision``: one already taken with ``reserve=acquire_reserve(timeout)`` (see :meth:`plan`).

        Returns:
            Seconds waited.

        Raises:
            RateLimited: When admission is further away than ``timeout`` (raised at
                once, without sleeping for nothing).
        """
        if timeout is not None and timeout < 0:
            raise ConfigurationError(f"acquire(timeout={timeout!r}): must be >= 0 seconds or None")
        if decision is None:
            decision = self.decide(cost, reserve=self.acquire_reserve(timeout), key=key, tier=tier)
        if not decision.allowed:
            raise RateLimited(decision.wait, self.name)
        if decision.wait > 0:
            self._emit("waited", decision.wait)
            self.sleep(decision.wait)
        return decision.wait

    @staticmethod
    def acquire_reserve(timeout: Optional[float]) -> float:
        """The ``reserve`` :meth:`acquire` decides with for ``timeout``."""
        return 86_400.0 if timeout is None else timeout

    def snapshot(self, key: Any = None, *, tier: TierLike = None) -> GcraSnapshot:
        """The bucket as the store sees it now: rate in force (override, adaptive factor) and tokens.

        Read-only. Raises :class:`~celery_tuning.errors.StorageError` when Redis fails (no policy
        applies: this is for operators, not for deciding).
        """
        interval, burst = self._params(key, tier)
        return self.store.snapshot(self.bucket(key), interval, burst)

    def reset(self, key: Any = None) -> None:
        """Forget state in every process's view. Without ``key``: the run-time override, the adaptive
        factor and the shared bucket; per-key buckets refill (and expire) on their own. With ``key``:
        that key's bucket only (its pause and spent tokens); the limiter's rate is left as it is.

        Raises :class:`~celery_tuning.errors.StorageError` when Redis fails.
        """
        self.store.reset(self.bucket(key), override=key is None)

    def throttle(self, retry_after: float, key: Any = None, *, tier: TierLike = None) -> None:
        """Admit nothing for ``retry_after`` seconds, in every process (e.g. after an HTTP 429).

        With adaptive mode the shared rate is also lowered and recovers slowly.
        """
        pause = int(max(0.0, retry_after) * 1_000_000)
        bucket = self.bucket(key)
        interval, burst = self._params(key, tier)
        self._emit("throttled", retry_after)
        try:
            self.store.pause(bucket, interval, burst, pause, self.adaptive)
        except StorageError as exc:
            self._storage_failed(exc)
            self._fallback.pause(bucket, interval, burst, pause, self.adaptive)

    def charge(self, n: int, key: Any = None, *, tier: TierLike = None) -> float:
        """Debit ``n`` tokens now, for a cost known only after the call (the LLM tokens it used).

        Never waits and never refuses: what the bucket does not hold is debt, and later acquires
        wait it out (one :meth:`acquire` after ``charge(600)`` on a 10/s limiter waits a minute).
        One round trip (``gcra_charge.lua``); the bucket's key lives until the debt is paid and
        the bucket full again, and a charge never moves the next admission more than a year ahead.
        ``n=0`` does nothing. The tokens are the key's tier's (``tier``, else ``per_key``).

        Never raises because Redis is down: with ``on_redis_error='local'`` the process's fallback
        bucket is charged; with ``'allow'`` or ``'deny'`` the charge is dropped (the outage is
        logged once, as for acquires).

        Returns:
            Seconds until a call of cost 1 would be admitted (0.0: the bucket still has a token).

        Raises:
            ConfigurationError: When ``n`` is not an integer >= 0.
        """
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or int(n) < 0:
            raise ConfigurationError(f"limiter {self.name!r}: charge(n={n!r}): expected an integer >= 0")
        if n == 0:
            return 0.0
        n = int(n)
        bucket = self.bucket(key)
        interval, burst = self._params(key, tier)
        try:
            debt = self.store.charge(bucket, interval, burst, n)
            self._redis_answered()
        except StorageError as exc:
            self._storage_failed(exc)
            if self.on_redis_error != "local":
                return 0.0
            debt = self._fallback.charge(bucket, interval, burst, n)
        return debt / 1_000_000

    def override(self, rate: Rate, burst: Optional[int] = None) -> None:
        """Put ``rate`` (and ``burst`` when given) in force for every process until :meth:`reset`
        (the operators' run-time change; the configured rate is left as it is). It applies to
        every bucket of the limiter, each key's tier included: the override wins for every key.

        Raises :class:`~celery_tuning.errors.StorageError` when Redis fails.
        """
        self.store.set_override(self.bucket(), interval_us(rate.period, rate.amount), burst)


class StackDecision(NamedTuple):
    """What :func:`decide_all` decided, and which limiter's wait decided it."""

    decision: Decision
    #: The limiter with the longest wait (the one that refused, or whose slot the call waits for);
    #: the first part's when nothing waits.
    limiter: GcraLimiter


def _same_store(a: Any, b: Any) -> bool:
    """Whether two stores keep their buckets in one place (each limiter has its own Redis store
    object on the app's one connector)."""
    if a is b:
        return True
    connector = getattr(a, "connector", None)
    return (type(a) is type(b) and connector is not None and connector is getattr(b, "connector", None)
            and getattr(a, "clock", None) is getattr(b, "clock", None))


def decide_all(parts: Sequence[Tuple[Any, ...]], *, reserve: Optional[float] = None) -> StackDecision:
    """One decision over several limiters (a task's stacked ``@rate_limit``): ``parts`` are
    ``(limiter, cost, key)`` or ``(limiter, cost, key, tier)`` (``tier`` as for
    :meth:`GcraLimiter.decide`; default: the key's ``per_key`` tier). Admitted only when every
    limiter admits; then each bucket pays its cost, else none pays anything. One round trip
    (``gcra_acquire_many.lua``) when there are two or more parts; one part is exactly
    :meth:`GcraLimiter.decide`.

    A part of cost 0 takes no token and is left out. The wait is the longest of the buckets'
    (refused: when every one of them admits; reserved: the call's slot, the latest of its buckets').
    ``reserve`` as for :meth:`GcraLimiter.decide`.

    Never raises because Redis is down: the first limiter's Redis-error policy answers, and with
    ``"local"`` the buckets are decided together in that limiter's in-process fallback store.

    Raises:
        ConfigurationError: On a cost that is not an integer >= 0, limiters on different stores, a
            bucket named twice, or (on Redis Cluster) buckets in different slots.
    """
    if not parts:
        raise ConfigurationError("decide_all(parts=[]): expected at least one (limiter, cost, key)")
    live: List[Tuple[GcraLimiter, int, Any, TierLike]] = []
    for part in parts:
        limiter, cost, key = part[:3]
        tier = part[3] if len(part) > 3 else None
        if isinstance(cost, numbers.Integral) and not isinstance(cost, bool) and cost == 0:
            continue
        limiter._check_cost(cost)
        live.append((limiter, int(cost), key, tier))
    if not live:
        return StackDecision(Decision(True, 0.0, "redis"), parts[0][0])
    if len(live) == 1:
        limiter, cost, key, tier = live[0]
        return StackDecision(limiter.decide(cost, reserve=reserve, key=key, tier=tier), limiter)
    first = live[0][0]
    store = first.store
    for limiter, _, _, _ in live[1:]:
        if not _same_store(limiter.store, store):
            raise ConfigurationError(
                f"stacked limiters {first.name!r} and {limiter.name!r} keep their buckets in different stores; "
                "one decision needs them in one")
    entries = []
    for limiter, cost, key, tier in live:
        interval, burst = limiter._params(key, tier)
        entries.append(StackedBucket(limiter.bucket(key), interval, burst, GcraLimiter._bounded(cost, interval, burst)))
    reserve_us = GcraLimiter._reserve_us(reserve)
    try:
        result = store.acquire_many(entries, reserve_us)
        source = "redis"
        for limiter, _, _, _ in live:
            limiter._redis_answered()
    except StorageError as exc:
        for limiter, _, _, _ in live:
            limiter._storage_failed(exc)
        if first.on_redis_error == "allow":
            return StackDecision(Decision(True, 0.0, "allow"), first)
        if first.on_redis_error == "deny":
            i = max(range(len(entries)), key=lambda j: entries[j].interval)
            return StackDecision(Decision(False, max(1.0, entries[i].interval / 1_000_000), "deny"), live[i][0])
        result = first._fallback.acquire_many(entries, reserve_us)
        source = "local"
    decider = live[result.which][0]
    if not result.allowed:
        return StackDecision(decider._decided(False, result.wait_us, source), decider)
    decision = Decision(True, result.wait_us / 1_000_000, source)
    for limiter, _, _, _ in live:
        limiter._decided(True, result.wait_us, source)
    return StackDecision(decision, decider)
