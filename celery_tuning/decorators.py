"""Decorators that attach policy to task functions; ``TunedTask`` applies it."""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, TypeVar, Union

from .conf import (
    Arg,
    callable_or_none,
    choice,
    count,
    parse_breaker_spec,
    parse_concurrency_per_key,
    parse_per_key,
    rate,
    seconds,
    sla_thresholds,
)
from .errors import ConfigurationError
from .policy.attach import (
    ON_LIMIT,
    ON_OPEN,
    BreakerPolicy,
    CachePolicy,
    ConcurrencyPolicy,
    RateLimitPolicy,
    SlaPolicy,
    attach_policy,
)
from .policy.debounce import DebouncePolicy
from .policy.dedupe import ON_DUPLICATE, UNTIL, DedupePolicy
from .policy.fair import FairPolicy

__all__ = ["cache_result", "circuit_breaker", "concurrency_limit", "debounce", "dedupe", "fair", "rate_limit", "sla"]

F = TypeVar("F", bound=Callable[..., Any])


# Every argument goes through the validators the settings use (celery_tuning.conf), named as
# the decorator argument in errors: ``@rate_limit(max_wait=-1): expected a number of seconds >= 0``.


def _seconds(decorator: str, name: str, value: Any, *, allow_zero: bool = True) -> float:
    return seconds(Arg(decorator, name), value, allow_zero=allow_zero)


def _count(decorator: str, name: str, value: Any, minimum: int = 1) -> int:
    return count(Arg(decorator, name), value, minimum)


def _key_function(decorator: str, value: Any) -> Any:
    return callable_or_none(Arg(decorator, "key"), value, "a callable taking the task's arguments")


def rate_limit(
    limit: str,
    *,
    burst: Optional[int] = None,
    key: Optional[Callable[..., Any]] = None,
    cost: Union[int, Callable[..., int]] = 1,
    per_key: Union[Mapping[Any, Any], Callable[[Any], Any], None] = None,
    on_limit: str = "auto",
    max_wait: float = 1.0,
    max_defer: float = 300.0,
    max_deferrals: int = 100,
    adaptive: bool = False,
) -> Callable[[F], F]:
    """Limit a task with a token bucket shared by every worker through Redis.

    Several ``@rate_limit`` on one task stack: a call is admitted only when every limit admits,
    tokens are taken from all of them or none, in one round trip; they must agree on
    ``on_limit``, ``max_wait``, ``max_defer`` and ``max_deferrals`` (see docs/ratelimits.md,
    "Stacked limits"; not on Redis Cluster).

    Arguments:
        limit: A name from ``tuning_rate_limits`` (``"openai"``) or an inline
            rate (``"10/s"``, ``"600/m"``, ``"5000/h"``) named after the task.
        burst: Bucket capacity for an inline rate (default 1); named limiters
            take theirs from the config.
        key: Per-key limit: called with the task's arguments
            (``key=lambda tenant_id, **kw: tenant_id``); one bucket per key,
            keys hashed before they reach Redis, idle buckets expire.
        cost: Tokens one run takes: an integer (1 to burst), or a callable taking the task's
            arguments (``cost=lambda text, **kw: len(text)``), called in the worker when the call
            is admitted and returning an integer >= 0 (0: the call takes no token). A callable's
            cost above the burst is admitted once the bucket is full, and the rest is debt
            that delays later calls. For costs known only after the call, see
            :meth:`~celery_tuning.GcraLimiter.charge`.
        per_key: Tiers: keys with a rate of their own (needs ``key``). For an inline rate, a dict
            ``{key value: "100/s" or {"rate": "100/s", "burst": 20}}`` (a named limiter takes its
            dict from ``tuning_rate_limits``). For either, a callable taking the call's key and
            returning its tier in one of those forms, or None for the configured one
            (``per_key=lambda tenant: "100/s" if premium(tenant) else None``), called per call
            in the worker; anything else fails the call with ``ConfigurationError`` naming
            ``per_key``. A run-time ``tuning limit set`` override wins over every key's tier.
        on_limit: ``"auto"`` (default) sleeps in the worker when the wait is at
            most ``max_wait`` and otherwise re-publishes the task for its
            reserved slot without touching ``request.retries``; ``"defer"``
            always re-publishes; ``"wait"`` only sleeps (up to ``max_wait``, then
            raises); ``"raise"`` raises :class:`~celery_tuning.RateLimited`.
        max_wait: Seconds a task may sleep in the worker for its slot.
        max_defer: Furthest a slot is reserved ahead (seconds); keep it below
            the Redis broker's ``visibility_timeout``.
        max_deferrals: Deferrals allowed per task before it fails with
            :class:`~celery_tuning.RateLimited` (its own budget, not ``max_retries``).
        adaptive: On :class:`~celery_tuning.Throttled`, halve the shared rate
            and recover it over a minute.

    Raises:
        ConfigurationError: On anything malformed, naming the argument; when stacked, on an
            argument the task's other ``@rate_limit`` sets differently, or a limiter named twice.
    """
    if not isinstance(limit, str) or not limit.strip():
        raise ConfigurationError(
            f"@rate_limit({limit!r}): expected a limiter name from tuning_rate_limits or a rate like '10/s'")
    name: Optional[str] = limit
    if "/" in limit:
        rate_ = rate(f"@rate_limit({limit!r})", limit)
        name = None
    else:
        rate_ = None
    if burst is not None:
        if rate_ is None:
            raise ConfigurationError(
                f"@rate_limit({limit!r}, burst={burst!r}): a named limiter takes its burst from "
                f"tuning_rate_limits[{limit!r}]")
        _count("rate_limit", "burst", burst)
    _key_function("rate_limit", key)
    if not callable(cost):
        cost = _count("rate_limit", "cost", cost)
    if not callable(cost) and rate_ is not None and cost > (burst or 1):
        raise ConfigurationError(f"@rate_limit(cost={cost}): must not exceed burst ({burst or 1})")
    if per_key is not None:
        per_key = _per_key(limit, rate_, key, cost, per_key)
    choice(Arg("rate_limit", "on_limit"), on_limit, ON_LIMIT)
    policy = RateLimitPolicy(
        name=name, rate=rate_, burst=burst, key=key, cost=cost, per_key=per_key, on_limit=on_limit,
        max_wait=_seconds("rate_limit", "max_wait", max_wait),
        max_defer=_seconds("rate_limit", "max_defer", max_defer, allow_zero=False),
        max_deferrals=_count("rate_limit", "max_deferrals", max_deferrals, minimum=0),
        adaptive=bool(adaptive),
    )

    def decorate(fun: F) -> F:
        attach_policy(fun, "rate_limit", policy, "rate_limit")
        return fun

    return decorate


def _per_key(limit: str, rate_: Any, key: Any, cost: Any, per_key: Any) -> Any:
    """``@rate_limit(per_key=...)`` checked: a callable, or (inline rates only) a dict of tiers."""
    if key is None:
        raise ConfigurationError(
            f"@rate_limit({limit!r}, per_key=...): tiers are per key; give key= too "
            "(key=lambda tenant_id, **kw: tenant_id)")
    if callable(per_key):
        return per_key
    if rate_ is None:
        raise ConfigurationError(
            f"@rate_limit({limit!r}, per_key={per_key!r}): a named limiter takes its per_key dict from "
            f"tuning_rate_limits[{limit!r}]; pass a callable (key -> rate) for tiers decided at run time")
    if not isinstance(per_key, Mapping):
        raise ConfigurationError(
            f"@rate_limit(per_key={per_key!r}): expected a dict like {{'enterprise': {{'rate': '100/s', "
            "'burst': 20}} or a callable taking the call's key")
    tiers = parse_per_key("@rate_limit(per_key)", per_key)
    for value, tier in tiers.items():
        if not callable(cost) and cost > tier.burst:
            raise ConfigurationError(
                f"@rate_limit(cost={cost}): must not exceed the burst of per_key[{value!r}] ({tier.burst})")
    return tiers


def circuit_breaker(
    name: str,
    *,
    on_open: str = "retry",
    fallback: Optional[Callable[..., Any]] = None,
    max_deferrals: int = 100,
    **options: Any,
) -> Callable[[F], F]:
    """Guard a task with a circuit breaker shared by every worker through Redis.

    Arguments:
        name: A key of ``tuning_circuit_breakers``, or a new name defined by
            ``options`` (``fail_max``, ``reset_timeout``, ``success_threshold``,
            ``trial_timeout``, ``exclude``).
        on_open: ``"retry"`` (default) re-publishes the task for when the breaker
            may close, without touching ``request.retries``; ``"fail"`` fails it
            with :class:`~celery_tuning.CircuitOpen` (a ``pybreaker.CircuitBreakerError``).
        fallback: Called with the task's arguments while the breaker is open;
            its return value becomes the task's result.
        max_deferrals: Deferrals allowed per task before it fails with ``CircuitOpen``.

    Raises:
        ConfigurationError: On anything malformed, naming the argument.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"@circuit_breaker({name!r}): expected a breaker name")
    choice(Arg("circuit_breaker", "on_open"), on_open, ON_OPEN)
    callable_or_none(Arg("circuit_breaker", "fallback"), fallback, "a callable")
    # The same validation as a tuning_circuit_breakers entry, named after the decorator.
    inline = parse_breaker_spec(f"@circuit_breaker({name!r})", options) if options else None
    policy = BreakerPolicy(name=name, on_open=on_open, fallback=fallback,
                           max_deferrals=_count("circuit_breaker", "max_deferrals", max_deferrals, minimum=0),
                           options=inline)

    def decorate(fun: F) -> F:
        attach_policy(fun, "breaker", policy, "circuit_breaker")
        return fun

    return decorate


def cache_result(
    ttl: float = 3600,
    *,
    l1_ttl: float = 60,
    key: Optional[Callable[..., Any]] = None,
    version: int = 1,
    vary_on: Optional[Sequence[str]] = None,
    max_size: int = 1_000_000,
    serializer: str = "json",
    short_circuit: bool = False,
    lock_timeout: Optional[float] = None,
    wait_timeout: Optional[float] = None,
) -> Callable[[F], F]:
    """Cache a task's result in a per-process TTL cache (L1) and Redis (L2).

    Identical calls (same task, version and canonical arguments) return the
    cached value; across all workers only one runs the body at a time for a
    key (single flight) while the others wait for its result.

    Arguments:
        ttl: Seconds a value lives in Redis.
        l1_ttl: Seconds a value lives in each process's memory (never longer than in Redis).
        key: Key function taking the task's arguments (default: all arguments, canonical JSON).
        version: Bump to ignore everything cached by earlier code.
        vary_on: Only these argument names make up the key.
        max_size: Encoded values larger than this many bytes are not cached.
        serializer: ``"json"`` (default) or ``"msgpack"``; never pickle.
        short_circuit: ``delay()``/``apply_async()`` return an ``EagerResult`` on a
            hit without publishing (no task id in the result backend, no signals).
        lock_timeout: Seconds followers trust a computing worker (default: the
            task's ``time_limit``, else 60).
        wait_timeout: Seconds a follower waits before running the body itself
            (default: ``lock_timeout`` + 1).

    Raises:
        ConfigurationError: On anything malformed, naming the argument.
    """
    ttl_ = _seconds("cache_result", "ttl", ttl, allow_zero=False)
    l1_ = _seconds("cache_result", "l1_ttl", l1_ttl)
    _key_function("cache_result", key)
    _count("cache_result", "version", version, minimum=0)
    if vary_on is not None and (isinstance(vary_on, str) or not all(isinstance(v, str) for v in vary_on)):
        raise ConfigurationError(f"@cache_result(vary_on={vary_on!r}): expected a list of argument names")
    _count("cache_result", "max_size", max_size)
    choice(Arg("cache_result", "serializer"), serializer, ("json", "msgpack"))
    if serializer == "msgpack":
        try:
            import msgpack  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "@cache_result(serializer='msgpack'): msgpack is not installed (pip install celery-tuning[msgpack])"
            ) from None
    policy = CachePolicy(
        ttl=ttl_, l1_ttl=l1_, key=key, version=version,
        vary_on=tuple(vary_on) if vary_on is not None else None, max_size=max_size, serializer=serializer,
        short_circuit=bool(short_circuit),
        lock_timeout=None if lock_timeout is None else _seconds("cache_result", "lock_timeout", lock_timeout,
                                                                allow_zero=False),
        wait_timeout=None if wait_timeout is None else _seconds("cache_result", "wait_timeout", wait_timeout),
    )

    def decorate(fun: F) -> F:
        if vary_on is not None:
            import inspect

            params = inspect.signature(fun).parameters
            missing = [v for v in vary_on if v not in params]
            if missing:
                raise ConfigurationError(
                    f"@cache_result(vary_on={list(vary_on)!r}): {fun.__name__}() has no argument(s) {missing}")
        attach_policy(fun, "cache", policy, "cache_result")
        return fun

    return decorate


def sla(
    warning: Optional[float] = None,
    critical: Optional[float] = None,
    on: str = "total",
) -> Callable[[F], F]:
    """Attach SLA thresholds to a task; a breach is logged and sent as a signal.

    Arguments:
        warning: Seconds above which the ``warning`` level is breached.
        critical: Seconds above which the ``critical`` level is breached.
        on: What is measured: ``"wait"`` (queue wait), ``"run"`` (run time)
            or ``"total"`` (first publish to finish, the time users feel).

    Raises:
        ConfigurationError: On non-positive thresholds, warning > critical,
            neither threshold given, or an unknown ``on``.
    """
    # The same checks as a tuning_sla entry, named after the decorator's arguments.
    w, c, on = sla_thresholds(f"@sla(warning={warning!r}, critical={critical!r})", lambda part: Arg("sla", part),
                              warning, critical, on)
    if w is None and c is None:
        raise ConfigurationError("@sla(): give warning=seconds, critical=seconds or both")
    policy = SlaPolicy(warning=w, critical=c, on=on)

    def decorate(fun: F) -> F:
        attach_policy(fun, "sla", policy, "sla")
        return fun

    return decorate


def concurrency_limit(name: Optional[str] = None, *, limit: Optional[int] = None,
                      key: Optional[Callable[..., Any]] = None,
                      per_key: Optional[Mapping[Any, Any]] = None, max_deferrals: int = 100,
                      max_wait: Optional[float] = None) -> Callable[[F], F]:
    """Run at most N of these tasks at once across every worker (N from ``tuning_concurrency_limits``,
    or ``limit=N`` inline); with ``key=``, at most N per key.

    A task that finds every slot taken is re-published for a little later without
    touching ``request.retries``. Slots are leases in Redis, renewed while the task
    runs, so a worker killed mid-task gives its slot back within
    ``tuning_concurrency_lease_ttl`` seconds.

    Example::

        @app.task
        @concurrency_limit(limit=2, key=lambda tenant_id, **kw: tenant_id)
        def sync(tenant_id, since): ...

    Arguments:
        name: A key of ``tuning_concurrency_limits`` (or give ``limit``).
        limit: An inline limit's cap, named after the task.
        key: Called with the task's arguments; returns the caller key (a tenant). Each key has
            its own cap (its ``per_key`` entry, else the limit's), its own leases and its own
            waiters; keys reach Redis only hashed, and an idle key's state expires. None: the
            limit's shared cap.
        per_key: An inline limit's per-key caps, ``{"acme": 10}`` (keys compared as ``str``; needs
            ``key``). Named limits take theirs from ``tuning_concurrency_limits``.
        max_deferrals: Deferrals allowed per task before it fails with
            :class:`~celery_tuning.ConcurrencyLimited`.
        max_wait: Seconds a call that has no message of its own to defer (``apply()``,
            a direct call, a member of ``map``/``starmap``/``chunks``) waits for a slot
            before raising :class:`~celery_tuning.ConcurrencyLimited` (default: the lease
            TTL; 0 raises at once).
    """
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise ConfigurationError(f"@concurrency_limit({name!r}): expected a name from tuning_concurrency_limits")
    if name is not None and limit is not None:
        raise ConfigurationError(
            f"@concurrency_limit({name!r}, limit={limit!r}): give a name from tuning_concurrency_limits "
            "or an inline limit=N, not both")
    if name is None and limit is None:
        raise ConfigurationError(
            "@concurrency_limit(): expected a name from tuning_concurrency_limits or an inline limit=N")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigurationError(f"@concurrency_limit(limit={limit!r}): expected an integer >= 1")
    if key is not None and not callable(key):
        raise ConfigurationError(f"@concurrency_limit(key={key!r}): expected a callable taking the task's arguments")
    caps: Optional[Dict[str, int]] = None
    if per_key is not None:
        if name is not None:
            raise ConfigurationError(
                f"@concurrency_limit({name!r}, per_key=...): a named limit takes its per-key caps from "
                f"tuning_concurrency_limits[{name!r}]['per_key']")
        if key is None:
            raise ConfigurationError("@concurrency_limit(per_key=...): needs key= (per_key caps are per caller key)")
        caps = parse_concurrency_per_key(Arg("concurrency_limit", "per_key"), per_key)
    policy = ConcurrencyPolicy(
        name=name, max_deferrals=_count("concurrency_limit", "max_deferrals", max_deferrals, minimum=0),
        max_wait=None if max_wait is None else _seconds("concurrency_limit", "max_wait", max_wait),
        limit=limit, key=key, per_key=caps)

    def decorate(fun: F) -> F:
        attach_policy(fun, "concurrency", policy, "concurrency_limit")
        return fun

    return decorate


def dedupe(
    *bare: Any,
    key: Optional[Callable[..., Any]] = None,
    until: str = "done",
    ttl: Optional[float] = None,
    on_duplicate: str = "return",
) -> Callable[[F], F]:
    """Publish a call only when no identical call is queued (or, with ``until="done"``, running).

    A duplicate's ``apply_async()``/``delay()`` returns the queued or running call's
    ``AsyncResult`` (same task id) without publishing anything. The lock is held by that task id:
    renewed while it runs, freed when it finishes, fails, hits its hard time limit or is revoked,
    and within ``tuning_concurrency_lease_ttl`` when its worker dies; a retry or a deferral keeps
    it. ``app.send_task`` by name does not go through ``apply_async`` and is never deduplicated
    (see docs/dedupe.md for it and canvas members).

    Arguments:
        key: Called with the task's arguments; calls whose values are equal are duplicates
            (``key=lambda account_id, **kw: account_id``). Default: every argument, as the result
            cache keys them (task name + canonical JSON of the arguments, hashed).
        until: ``"done"`` (default): a call keeps identical calls out until it finishes;
            ``"started"``: only while it is queued (a new call goes through once its body starts).
        ttl: Upper bound on a lock's life in seconds, whatever happens (a call still queued after
            it no longer keeps identical calls out). Default: ``tuning_dedupe_ttl``.
        on_duplicate: ``"return"`` (default) the holder's ``AsyncResult``; ``"raise"``
            :class:`~celery_tuning.DuplicateTask` (its ``holder_id`` names the holder); ``"ignore"``
            returns None.

    Raises:
        ConfigurationError: On anything malformed, naming the argument.
    """
    if bare:
        raise ConfigurationError(
            "@dedupe takes keyword arguments only: write @dedupe() or @dedupe(key=..., until=..., ttl=..., "
            f"on_duplicate=...), not @dedupe or @dedupe({bare[0]!r})")
    _key_function("dedupe", key)
    choice(Arg("dedupe", "until"), until, UNTIL)
    choice(Arg("dedupe", "on_duplicate"), on_duplicate, ON_DUPLICATE)
    policy = DedupePolicy(key=key, until=until, on_duplicate=on_duplicate,
                          ttl=None if ttl is None else _seconds("dedupe", "ttl", ttl, allow_zero=False))

    def decorate(fun: F) -> F:
        attach_policy(fun, "dedupe", policy, "dedupe")
        return fun

    return decorate


def debounce(delay: float, key: Optional[Callable[..., Any]] = None,
             max_wait: Optional[float] = None) -> Callable[[F], F]:
    """Collapse calls made within ``delay`` seconds of each other into one run with the latest arguments.

    ``apply_async()``/``delay()`` publishes nothing: the call waits in the tuning Redis as its key's
    pending run, due ``delay`` after the last call (at most ``max_wait`` after the first), and
    returns that run's ``AsyncResult`` (every collapsed caller gets the same id). The parking mover
    in the workers publishes it when due. A call that comes while the key's run executes schedules
    exactly one more run, after it. Needs ``tuning_defer_via="park"`` and a JSON serializer (see
    docs/debounce.md).

    Arguments:
        delay: Seconds after the last call the run is due (> 0).
        key: Called with the task's arguments; only calls whose values are equal collapse
            (``key=lambda account_id, **kw: account_id``). Default: the task alone, so calls
            with different arguments collapse.
        max_wait: At most this many seconds after the first collapsed call (>= ``delay``;
            default: no bound, a steady stream of calls closer than ``delay`` never runs).

    Raises:
        ConfigurationError: On anything malformed, naming the argument.
    """
    delay_ = _seconds("debounce", "delay", delay, allow_zero=False)
    _key_function("debounce", key)
    max_wait_ = None if max_wait is None else _seconds("debounce", "max_wait", max_wait, allow_zero=False)
    if max_wait_ is not None and max_wait_ < delay_:
        raise ConfigurationError(
            f"@debounce(max_wait={max_wait!r}): expected a number of seconds >= delay ({delay!r})")
    policy = DebouncePolicy(delay=delay_, key=key, max_wait=max_wait_)

    def decorate(fun: F) -> F:
        attach_policy(fun, "debounce", policy, "debounce")
        return fun

    return decorate


def fair(*bare: Any, key: Optional[Callable[..., Any]] = None,
         weights: Union[Mapping[Any, int], Callable[[Any], int], None] = None) -> Callable[[F], F]:
    """Queue a task's calls per key and release them round-robin across keys (fair queues).

    ``apply_async()``/``delay()`` publishes nothing: the call joins its key's list in the tuning
    Redis and returns its ``AsyncResult``. A dispatcher in the workers (the parking mover's thread)
    releases the calls into the task's queue one key at a time, keeping at most a window of
    released-but-not-started messages per queue (``tuning_fair_window``, default the consuming
    workers' concurrency x prefetch), so one key's backlog never delays another key's calls by
    more than a window. Needs ``tuning_defer_via="park"`` and a JSON serializer (see docs/fair.md).

    Arguments:
        key: Called with the task's arguments (``key=lambda tenant_id, **kw: tenant_id``); calls
            whose values are equal (as ``str()``) share a turn.
        weights: Messages a key gives per turn: ``{"enterprise": 4}`` (keys as ``str()``, others 1)
            or a callable taking the key's value and answering an integer >= 1.

    Raises:
        ConfigurationError: On anything malformed, naming the argument.
    """
    if bare or key is None:
        raise ConfigurationError(
            "@fair takes keyword arguments only and needs key=: write @fair(key=lambda tenant_id, **kw: "
            "tenant_id) or @fair(key=..., weights={...})")
    _key_function("fair", key)
    table: Union[Dict[str, int], Callable[[Any], int], None]
    if weights is None or callable(weights):
        table = weights
    elif isinstance(weights, Mapping):
        table = {}
        for name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"@fair(weights=...): the weight of {name!r} must be an integer >= 1, got {value!r}")
            table[str(name)] = value
    else:
        raise ConfigurationError(
            f"@fair(weights={weights!r}): expected a mapping of key -> integer >= 1, a callable, or None")
    policy = FairPolicy(key=key, weights=table)

    def decorate(fun: F) -> F:
        attach_policy(fun, "fair", policy, "fair")
        return fun

    return decorate
