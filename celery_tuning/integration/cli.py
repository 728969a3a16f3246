"""The ``celery -A proj tuning ...`` command, registered through ``celery.commands``."""

from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import click

from ..conf import SETTINGS, BreakerSpec
from ..errors import ConfigurationError, StorageError
from ..policy.advise import quantile
from .runtime import runtime_for

__all__ = ["tuning"]


@contextlib.contextmanager
def _as_cli_error() -> Iterator[None]:
    """Show a configuration or Redis failure as one line and exit non-zero (no traceback)."""
    try:
        yield
    except (ConfigurationError, StorageError) as exc:
        raise click.ClickException(str(exc)) from None


def _runtime(ctx: click.Context) -> Any:
    app = ctx.obj.app
    try:
        return runtime_for(app)
    except ConfigurationError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


@click.group(name="tuning", help="Inspect and control celery-tuning.")
def tuning() -> None:
    """celery-tuning commands."""


@tuning.command(help="Validate the tuning_* settings (refusing what a worker start refuses, profiles included) "
                     "and check the tuning Redis.")
@click.pass_context
def check(ctx: click.Context) -> None:
    runtime = _runtime(ctx)
    _check_profiles(ctx.obj.app, runtime.config)
    click.echo("settings: ok")
    if runtime.in_memory:
        click.echo("store: memory:// (in this process only: every worker and producer process has its own "
                   "limits, breakers, leases and cache; set tuning_redis_url to share them)")
        return
    try:
        connector = runtime.connector
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        rtt = connector.ping()
        server_ms = connector.evalsha("server_time", keys=[], args=[])
    except StorageError as exc:
        click.echo(f"redis: {connector.safe_url} unreachable: {exc}", err=True)
        sys.exit(1)
    click.echo(f"redis: {connector.safe_url} ok ({rtt * 1000:.2f} ms round trip)")
    click.echo(f"lua: scripts load (server time {int(server_ms)} ms)")
    if runtime.config.defer_via == "park":
        _check_persistence(connector)


def _check_profiles(app: Any, config: Any) -> None:
    """Refuse what a worker start refuses (the same function), and warn about a worker without -Q."""
    from ..policy.profiles import ProfileConflict, choose_profile
    from .profiles import configured_queues, validate_profiles

    try:
        validate_profiles(config)
    except ConfigurationError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None
    if not config.queue_profiles:
        return
    queues = configured_queues(app)
    try:
        choose_profile(queues, config.queue_profiles)
    except ProfileConflict as exc:
        click.echo(f"WARNING profiles: a worker started without -Q consumes {', '.join(queues)} and refuses to "
                   f"start: {exc}", err=True)


def persistence_of(connector: Any) -> Optional[Dict[str, str]]:
    """The tuning Redis's ``appendonly`` and ``save`` settings, or None when CONFIG is not allowed."""
    try:
        client = connector.client
        found = {**client.config_get("appendonly"), **client.config_get("save")}
    except Exception:  # CONFIG renamed or disabled (managed Redis), ACL, cluster proxy
        return None
    return {key: _text(found.get(key, "")) for key in ("appendonly", "save")}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_persistence(connector: Any) -> None:
    found = persistence_of(connector)
    if found is None:
        click.echo("parking: could not read the tuning Redis's persistence settings (CONFIG GET is disabled); "
                   "parked tasks live only in Redis: make sure it keeps its data (AOF or RDB) across restarts",
                   err=True)
        return
    aof = found["appendonly"].lower() == "yes"
    rdb = bool(found["save"].strip())
    if not aof and not rdb:
        click.echo("WARNING parking: the tuning Redis has neither AOF (appendonly no) nor RDB snapshots (save ''): "
                   "parked tasks are lost if it restarts; enable persistence or set tuning_defer_via='countdown'",
                   err=True)
        return
    kinds = " and ".join(k for k, on in (("AOF", aof), ("RDB", rdb)) if on)
    click.echo(f"parking: the tuning Redis persists with {kinds}")


Sample = Tuple[str, Dict[str, str], float]


def metric_samples(text: str) -> List[Sample]:
    """(name, labels, value) of every sample of a Prometheus text page.

    Raises:
        ValueError: When ``text`` is not Prometheus text.
    """
    from prometheus_client.parser import text_string_to_metric_families

    try:
        samples = [(s.name, dict(s.labels), float(s.value)) for family in text_string_to_metric_families(text)
                   for s in family.samples]
        for name, labels, _ in samples:
            if name.endswith("_bucket"):
                float(labels["le"])  # a histogram bucket has a numeric upper bound
    except Exception as exc:  # the parser raises ValueError, IndexError, ... on a page that is not metrics
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ValueError(f"not Prometheus text ({exc.__class__.__name__}: {detail})") from None
    return samples


def sla_summary(text: str) -> list[dict]:
    """Per-queue SLA figures from a /metrics page (the worker's Prometheus endpoint).

    Raises:
        ValueError: When ``text`` is not Prometheus text.
    """
    return _sla_rows(metric_samples(text))


def _sla_rows(samples: List[Sample]) -> list[dict]:
    queues: Dict[str, Dict[str, Any]] = {}

    def row(queue: str) -> Dict[str, Any]:
        return queues.setdefault(queue, {"queue": queue, "attempts": 0.0, "checked": 0.0, "warning": 0.0,
                                         "critical": 0.0, "buckets": {}})

    for name, labels, value in samples:
        queue = labels.get("queue")
        if queue is None:
            continue
        if name == "celery_tuning_sla_checked_total":
            row(queue)["checked"] += value
        elif name == "celery_tuning_sla_breaches_total" and labels.get("level") in ("warning", "critical"):
            row(queue)[labels["level"]] += value
        elif name == "celery_tuning_task_queue_wait_seconds_count":
            row(queue)["attempts"] += value
        elif name == "celery_tuning_task_queue_wait_seconds_bucket" and "le" in labels:
            b = row(queue)["buckets"]
            b[float(labels["le"])] = b.get(float(labels["le"]), 0.0) + value
    out = []
    for queue in sorted(queues):
        r = queues[queue]
        cumulative = sorted(r.pop("buckets").items())
        r["wait_p50"] = quantile(cumulative, 0.5)
        r["wait_p95"] = quantile(cumulative, 0.95)
        r["compliance"] = (1 - r["critical"] / r["checked"]) if r["checked"] else None
        out.append(r)
    return out


_SECRET_ARG = ("pass", "pwd", "token", "secret", "key", "auth")


def _url_shown(url: str) -> str:
    """``url`` for messages: the userinfo's password and secret-looking query values as ``***``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            netloc = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
        query = urlencode([(k, "***" if any(w in k.lower() for w in _SECRET_ARG) else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:  # not even a URL: show its scheme only
        return url.split("://", 1)[0] + "://..." if "://" in url else "..."


def _check_metrics_url(url: str) -> None:
    """Refuse a metrics URL that is not http(s)://HOST..., before anything is printed."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as exc:
        raise click.ClickException(f"metrics URL {_url_shown(url)!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.ClickException(f"metrics URL {_url_shown(url)!r} is not an http(s) URL; expected e.g. "
                                   "http://127.0.0.1:9808/metrics")


def _scrape(url: str) -> List[Sample]:
    """The samples of a worker's /metrics page, or a one-line error naming the URL (its secrets
    hidden) and the problem. ``user:password@`` in the URL is sent as HTTP basic auth."""
    import base64
    import http.client
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    shown = _url_shown(url)
    try:
        parts = urlsplit(url)
        headers = {}
        if parts.username is not None:
            pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
            netloc = parts.netloc.rsplit("@", 1)[1]
            url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            body = response.read()
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError, HTTPError, timeouts, bad URLs
        raise click.ClickException(f"metrics endpoint {shown} unreachable ({exc})") from None
    try:
        return metric_samples(body.decode())
    except UnicodeDecodeError:
        raise click.ClickException(f"metrics endpoint {shown} did not serve Prometheus metrics (not UTF-8 text)") \
            from None
    except ValueError as exc:
        raise click.ClickException(f"metrics endpoint {shown} did not serve Prometheus metrics: {exc}") from None


def _default_metrics_url(runtime: Any) -> Optional[str]:
    port = runtime.config.metrics_port
    return f"http://127.0.0.1:{port}/metrics" if port else None


def _print_sla(url: str, samples: List[Sample]) -> None:
    rows = _sla_rows(samples)
    click.echo(f"SLA by queue (from {_url_shown(url)}, since the worker started):")
    if not rows:
        click.echo("  no task attempts recorded yet")
    for r in rows:
        def secs(v: Optional[float]) -> str:
            return "-" if v is None else f"{v:.3f}s"

        compliance = "-" if r["compliance"] is None else f"{r['compliance'] * 100:.2f}%"
        click.echo(f"  {r['queue']}: attempts {r['attempts']:.0f}, wait p50 {secs(r['wait_p50'])} "
                   f"p95 {secs(r['wait_p95'])}, SLA checked {r['checked']:.0f}, warning {r['warning']:.0f}, "
                   f"critical {r['critical']:.0f}, compliance {compliance}")


@tuning.command(help="Show the effective settings, where each came from, and SLA figures per queue "
                     "(exit 1 when the metrics URL cannot be read or serves no Prometheus text).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--metrics-url", default=None,
              help="A worker's http(s) /metrics URL (default: 127.0.0.1 on tuning_metrics_port when set).")
@click.pass_context
def status(ctx: click.Context, as_json: bool, metrics_url: Optional[str]) -> None:
    if metrics_url is not None:
        _check_metrics_url(metrics_url)
    runtime = _runtime(ctx)
    rows = []
    for setting in SETTINGS:
        value: Any = runtime.config.value_of(setting)
        if setting.name == "tuning_redis_url":
            try:
                value = "memory://" if runtime.in_memory else runtime.connector.safe_url
            except ConfigurationError as exc:
                value = f"<{exc}>"
        rows.append((setting.name, _shown(value), runtime.config.sources[setting.name]))
    if as_json:
        click.echo(json.dumps({name: {"value": repr(v), "source": s} for name, v, s in rows},
                              indent=2))
        return
    width = max(len(name) for name, _, _ in rows)
    click.echo(f"enabled in this process: {runtime.enabled}")
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value!r}  ({source})")
    url = metrics_url or _default_metrics_url(runtime)
    if url:
        _print_sla(url, _scrape(url))


def _shown(value: Any) -> Any:
    """A setting's value as operators wrote it: breaker specs as the dicts they configured."""
    if isinstance(value, dict) and value and all(isinstance(v, BreakerSpec) for v in value.values()):
        return {name: {f: getattr(spec, f) for f in ("fail_max", "reset_timeout", "success_threshold",
                                                        "trial_timeout", "exclude")}
                for name, spec in value.items()}
    return value


@tuning.command(help="Recommend a profile per queue from observed CPU-time/run-time ratios and queue waits "
                     "(exit 1 when a metrics URL cannot be read or serves no Prometheus text).")
@click.option("--metrics-url", "urls", multiple=True,
              help="A worker's http(s) /metrics URL; repeat for several workers "
                   "(default: 127.0.0.1 on tuning_metrics_port when set).")
@click.option("--min-attempts", default=20, show_default=True, type=click.IntRange(1),
              help="Task attempts a queue needs before it gets advice.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def advise(ctx: click.Context, urls: Any, min_attempts: int, as_json: bool) -> None:
    from ..policy.advise import advise as advise_queues
    from ..policy.advise import observe

    for url in urls:
        _check_metrics_url(url)
    runtime = _runtime(ctx)
    urls = list(urls) or [u for u in [_default_metrics_url(runtime)] if u]
    if not urls:
        raise click.ClickException("advise reads the workers' metrics: pass --metrics-url URL "
                                   "or set tuning_metrics_port")
    samples: List[Sample] = []
    for url in urls:
        samples.extend(_scrape(url))
    advice = advise_queues(observe(samples), runtime.config.queue_profiles, min_attempts)
    if as_json:
        click.echo(json.dumps([a.as_dict() for a in advice], indent=2))
        return
    if not advice:
        click.echo("no task attempts recorded yet (is tuning_timing on and have tasks run?)")
    for a in advice:
        head = f"{a.queue}: profile {a.profile}" if a.profile else f"{a.queue}: -"
        if a.current and a.current != a.profile:
            head += f" (configured: {a.current})"
        click.echo(head + " - " + "; ".join(a.reasons))


@tuning.group(help="Show and change shared rate limits at run time (no restart).")
def limit() -> None:
    """Rate-limit commands."""


def _limiter(ctx: click.Context, name: str) -> Any:
    runtime = _runtime(ctx)
    with _as_cli_error():
        return runtime.registry.limiter(name)


@limit.command("show", help="Configured rate, the rate in force (override, adaptive factor) and tokens now.")
@click.argument("names", nargs=-1)
@click.option("--key", "keys", multiple=True, metavar="KEY",
              help="A per-key bucket (the value the task's key function returns); repeatable.")
@click.pass_context
def limit_show(ctx: click.Context, names: Any, keys: Any) -> None:
    runtime = _runtime(ctx)
    for name in names or sorted(runtime.config.rate_limits):
        lim = _limiter(ctx, name)
        for key in keys or (None,):
            with _as_cli_error():
                snap = lim.snapshot(key)
            extra = " (override)" if snap.overridden else ""
            if snap.factor is not None:
                extra += f" (adaptive factor {snap.factor:.2f})"
            click.echo(f"{_limit_label(name, key)}: configured {lim.rate} burst {lim.burst}; "
                       f"effective {snap.rate_per_second:.4g}/s burst {snap.burst}{extra}; tokens now {snap.tokens}")


def _limit_label(name: str, key: Any) -> str:
    return name if key is None else f"{name} (key {key!r})"


@limit.command("set", help="Override a limiter's rate for every worker until reset.")
@click.argument("name")
@click.argument("rate")
@click.option("--burst", type=int, default=None, help="New bucket capacity.")
@click.pass_context
def limit_set(ctx: click.Context, name: str, rate: str, burst: Any) -> None:
    from ..policy.rates import parse_rate

    try:
        parsed = parse_rate(rate)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="RATE") from None
    if burst is not None and burst < 1:
        raise click.BadParameter(f"{burst} must be >= 1", param_hint="--burst")
    lim = _limiter(ctx, name)
    with _as_cli_error():
        lim.override(parsed, burst)
    click.echo(f"{name}: now {parsed}" + (f" burst {burst}" if burst else "") + " for every worker")


@limit.command("reset", help="Drop the run-time override, the adaptive factor and the shared bucket; "
                             "with --key, only those keys' buckets.")
@click.argument("name")
@click.option("--key", "keys", multiple=True, metavar="KEY",
              help="Clear this per-key bucket (its pause and spent tokens) and nothing else; repeatable.")
@click.pass_context
def limit_reset(ctx: click.Context, name: str, keys: Any) -> None:
    lim = _limiter(ctx, name)
    for key in keys or (None,):
        with _as_cli_error():
            lim.reset(key)
        if key is None:
            click.echo(f"{name}: back to the configured {lim.rate} burst {lim.burst} "
                       "(per-key buckets refill on their own; --key clears one)")
        else:
            click.echo(f"{_limit_label(name, key)}: bucket cleared (the limiter's rate is unchanged)")


@tuning.group(help="Show and operate shared circuit breakers.")
def breaker() -> None:
    """Circuit-breaker commands."""


def _breaker(ctx: click.Context, name: str) -> Any:
    runtime = _runtime(ctx)
    with _as_cli_error():
        return runtime.registry.breaker(name)


def _describe(name: str, b: Any) -> str:
    snap = b.refresh()
    extra = ""
    if snap.state == "open":
        extra = f", trial allowed in {snap.remaining_us / 1_000_000:.1f}s"
    elif snap.state == "half-open":
        extra = ", trial running" if snap.remaining_us else ", waiting for a trial call"
    return (f"{name}: {snap.state} (failures {snap.failures}/{b.fail_max}, reset_timeout {b.reset_timeout:g}s"
            f"{extra})")


@breaker.command("show", help="State, failure count and time to the next trial.")
@click.argument("names", nargs=-1)
@click.pass_context
def breaker_show(ctx: click.Context, names: Any) -> None:
    runtime = _runtime(ctx)
    for name in names or sorted(runtime.config.circuit_breakers):
        click.echo(_describe(name, _breaker(ctx, name)))


def _operate(ctx: click.Context, name: str, action: str) -> None:
    b = _breaker(ctx, name)
    getattr(b, action)()
    if b.degraded:
        raise click.ClickException(f"{name}: the tuning Redis is unreachable; nothing changed")
    click.echo(_describe(name, b))


@breaker.command("open", help="Open a breaker for every worker (e.g. during a provider incident).")
@click.argument("name")
@click.pass_context
def breaker_open(ctx: click.Context, name: str) -> None:
    _operate(ctx, name, "open")


@breaker.command("close", help="Close a breaker for every worker.")
@click.argument("name")
@click.pass_context
def breaker_close(ctx: click.Context, name: str) -> None:
    _operate(ctx, name, "close")


@breaker.command("reset", help="Forget a breaker's shared state (closed, no failures).")
@click.argument("name")
@click.pass_context
def breaker_reset(ctx: click.Context, name: str) -> None:
    _operate(ctx, name, "reset")


@tuning.group(help="Show, release and purge tasks parked in the tuning Redis (tuning_defer_via='park').",
              invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def parked(ctx: click.Context, as_json: bool) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from .mover import parked_by_limit, parked_snapshot

    runtime = _runtime(ctx)
    with _as_cli_error():
        # A per-key limit's caller keys add up under the limit (tenants are never listed).
        rows = parked_by_limit(parked_snapshot(runtime.registry.park_store()))
    if as_json:
        click.echo(json.dumps([{"reason": r.reason, "name": r.name, "due": r.due, "waiting": r.waiting,
                                "claimed": r.claimed, "next_due_in": r.next_due_in, "oldest_age": r.oldest_age,
                                "keys": r.keys}
                               for r in rows], indent=2))
        return
    if not rows:
        click.echo("no parked tasks")
        return
    for row in rows:
        next_due = "-" if row.next_due_in is None else f"{row.next_due_in:.1f}s"
        oldest = "-" if row.oldest_age is None else f"{row.oldest_age:.1f}s"
        keyed = f" (over {row.keys} caller keys)" if row.keys else ""
        click.echo(f"{row.reason}:{row.name}: due {row.due}, waiting {row.waiting}, claimed {row.claimed}, "
                   f"next due in {next_due}, oldest {oldest}{keyed}")


_REASON = click.Choice(["rate_limit", "concurrency", "circuit_open"])


def _limit_name(where: Any) -> str:
    """The name a spot is filed under: a per-key concurrency limit's caller-key spot, its limit's."""
    from ..storage.keys import split_keyed_spot

    return split_keyed_spot(where.name)[0] if where.reason == "concurrency" else str(where.name)


def _spots(ctx: click.Context, name: str, reason: Optional[str]) -> Any:
    from ..storage.park import Spot

    runtime = _runtime(ctx)
    store = runtime.registry.park_store()
    with _as_cli_error():
        # NAME covers the spots of every caller key of a per-key limit too.
        known = [s for s in store.spots() if _limit_name(s) == name and (reason is None or s.reason == reason)]
    if not known and reason is not None:
        known = [Spot(reason, name)]
    if not known:
        config = runtime.config
        if not any(name in names for names in (config.rate_limits, config.concurrency_limits,
                                                config.circuit_breakers)):
            raise click.ClickException(
                f"no parked tasks named {name!r}, and no limiter, concurrency limit or breaker of that name "
                "in tuning_rate_limits, tuning_concurrency_limits or tuning_circuit_breakers")
        click.echo(f"no parked tasks named {name!r}")
    return store, known


@parked.command("release", help="Make every task parked under NAME due now (the movers publish them).")
@click.argument("name")
@click.option("--reason", type=_REASON, default=None, help="Only this reason (default: every reason).")
@click.pass_context
def parked_release(ctx: click.Context, name: str, reason: Optional[str]) -> None:
    store, spots = _spots(ctx, name, reason)
    with _as_cli_error():
        _per_limit(spots, store.release, "released")


@parked.command("purge", help="Drop every task parked under NAME (they never run; results stay PENDING).")
@click.argument("name")
@click.option("--reason", type=_REASON, default=None, help="Only this reason (default: every reason).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def parked_purge(ctx: click.Context, name: str, reason: Optional[str], yes: bool) -> None:
    store, spots = _spots(ctx, name, reason)
    if spots and not yes:
        names = ", ".join(sorted({f"{s.reason}:{_limit_name(s)}" for s in spots}))
        click.confirm(f"drop every task parked at {names}? they will never run", abort=True)
    with _as_cli_error():
        _per_limit(spots, store.purge, "purged")


def _per_limit(spots: Any, operate: Any, done: str) -> None:
    """Run ``operate`` on every spot, one line per (reason, limit): a per-key limit's caller keys add up."""
    totals: Dict[Tuple[str, str], List[int]] = {}
    for where in spots:
        label = (where.reason, _limit_name(where))
        total = totals.setdefault(label, [0, 0])
        total[0] += int(operate(where))
        total[1] += where.name != label[1]
    for (reason, name), (count, keyed) in sorted(totals.items()):
        over = f" (over {keyed} caller keys)" if keyed else ""
        click.echo(f"{reason}:{name}: {done} {count}{over}")


@tuning.group(help="Inspect and clear result caches.")
def cache() -> None:
    """Result-cache commands."""


def _cached_task(ctx: click.Context, name: str) -> Any:
    app = ctx.obj.app
    app.loader.import_default_modules()
    task = app.tasks.get(name)
    if task is None:
        raise click.ClickException(f"no task named {name!r} (is its module imported by the app?)")
    handle = getattr(type(task), "cache", None)
    if handle is None or not hasattr(handle, "clear"):
        raise click.ClickException(f"task {name!r} has no @cache_result")
    return handle


@cache.command("stats", help="Entries in Redis for a cached task (uses SCAN).")
@click.argument("task_name")
@click.pass_context
def cache_stats(ctx: click.Context, task_name: str) -> None:
    handle = _cached_task(ctx, task_name)
    with _as_cli_error():
        entries = handle.entries()
        generation = handle.generation()
    policy = handle.policy
    click.echo(f"{task_name}: {entries} entries in Redis (version {policy.version}, generation {generation}, "
               f"ttl {policy.ttl:g}s, l1_ttl {policy.l1_ttl:g}s, serializer {policy.serializer})")


@cache.command("clear", help="Drop every cached result of a task, in Redis and every worker's memory.")
@click.argument("task_name")
@click.pass_context
def cache_clear(ctx: click.Context, task_name: str) -> None:
    handle = _cached_task(ctx, task_name)
    with _as_cli_error():
        generation = handle.clear()
    click.echo(f"{task_name}: cleared (generation {generation})")


@tuning.group(help="Show and clear @dedupe locks (one queued or running call per key).")
def dedupe() -> None:
    """Dedupe commands."""


def _deduped_task(ctx: click.Context, name: str) -> Any:
    app = ctx.obj.app
    app.loader.import_default_modules()
    task = app.tasks.get(name)
    if task is None:
        raise click.ClickException(f"no task named {name!r} (is its module imported by the app?)")
    handle = getattr(type(task), "dedupe", None)
    if handle is None or not hasattr(handle, "locks"):
        raise click.ClickException(f"task {name!r} has no @dedupe")
    return handle


@dedupe.command("show", help="Held locks of a task: key digest, holder task id, queued or running, age, "
                             "time to expiry (renewed while running) and to the deadline (ttl).")
@click.argument("task_name")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1), help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def dedupe_show(ctx: click.Context, task_name: str, limit: int, as_json: bool) -> None:
    handle = _deduped_task(ctx, task_name)
    with _as_cli_error():
        locks = handle.locks(limit + 1)  # one more: tells whether there are more than shown
    more = len(locks) > limit
    locks = locks[:limit]
    if as_json:
        click.echo(json.dumps([{"digest": lock.digest, "holder": lock.holder, "state": lock.state,
                                "age": lock.age_us / 1e6, "expires_in": lock.expires_in_us / 1e6,
                                "deadline_in": lock.deadline_in_us / 1e6} for lock in locks], indent=2))
        return
    if not locks:
        click.echo(f"{task_name}: no locks held")
        return
    for lock in locks:
        click.echo(f"{lock.digest[:16]} {lock.holder} {lock.state}, age {lock.age_us / 1e6:.1f}s, "
                   f"expires in {lock.expires_in_us / 1e6:.1f}s, deadline in {lock.deadline_in_us / 1e6:.1f}s")
    if more:
        click.echo(f"... more locks are held: the first {limit} (soonest expiry first) are shown; --limit N shows more")


@dedupe.command("clear", help="Drop every lock of a task: the next identical call is published (calls already "
                              "queued still run; a running call's lock returns at its next renewal).")
@click.argument("task_name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def dedupe_clear(ctx: click.Context, task_name: str, yes: bool) -> None:
    handle = _deduped_task(ctx, task_name)
    if not yes:
        click.confirm(f"drop every @dedupe lock of {task_name}? identical calls will be published again",
                      abort=True)
    with _as_cli_error():
        dropped = handle.clear()
    click.echo(f"{task_name}: dropped {dropped} lock(s)")


@tuning.group(help="Show @fair queues: calls waiting per key in the tuning Redis for their turn.")
def fair() -> None:
    """Fair-queue commands."""


@fair.command("show", help="Per queue: messages and keys waiting, the window in use (released, not started) "
                           "and its size, released in total, and the deepest keys (as digests: sha256 of "
                           "str(key), 24 hex digits; tenants' own names never reach Redis).")
@click.option("--top", default=10, show_default=True, type=click.IntRange(0), help="Deepest keys shown per queue.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
@click.pass_context
def fair_show(ctx: click.Context, top: int, as_json: bool) -> None:
    from .steps.fair import fair_store

    runtime = _runtime(ctx)
    with _as_cli_error():
        store = fair_store(runtime)
        snaps = [(queue, store.snapshot(queue, top=top)) for queue in store.queues()]
    window = runtime.config.fair_window
    if as_json:
        click.echo(json.dumps([{"queue": q, "waiting": s.waiting, "keys": s.keys, "in_window": s.in_window,
                                "window": window if window is not None else s.capacity, "claimed": s.claimed,
                                "undeliverable": s.undeliverable, "released_total": s.released_total,
                                "deepest": [{"key": d, "waiting": n} for d, n in s.deepest]}
                               for q, s in snaps], indent=2))
        return
    if not snaps:
        click.echo("no fair queues")
        return
    for queue, snap in snaps:
        size = f"{window} (tuning_fair_window)" if window is not None else f"{snap.capacity} (consumers)"
        click.echo(f"{queue}: waiting {snap.waiting} over {snap.keys} keys, window in use {snap.in_window} "
                   f"of {size}, claimed {snap.claimed}, released {snap.released_total}"
                   + (f", undeliverable {snap.undeliverable}" if snap.undeliverable else ""))
        for digest, depth in snap.deepest:
            click.echo(f"  {digest} {depth}")


@fair.command("purge", help="Drop the calls of QUEUE not yet published, or only those of one key: waiting for "
                            "their turn, claimed by a dispatcher (one being published as this runs is dropped "
                            "by the worker) and undeliverable. They never run; results stay PENDING. Calls "
                            "already published to the queue still run.")
@click.argument("queue")
@click.option("--key", "key", default=None, metavar="VALUE",
              help="Only this key's calls: the value the task's key= returns (a tenant), hashed as stored.")
@click.option("--digest", default=None, metavar="DIGEST", help="Only this key's calls, by the digest "
                                                               "`tuning fair show` prints.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def fair_purge(ctx: click.Context, queue: str, key: Optional[str], digest: Optional[str], yes: bool) -> None:
    from ..storage.keys import key_digest
    from .steps.fair import fair_store

    if key is not None and digest is not None:
        raise click.UsageError("give --key or --digest, not both")
    if key is not None:
        digest = key_digest(key)
    runtime = _runtime(ctx)
    with _as_cli_error():
        store = fair_store(runtime)
        known = queue in store.queues()
        snap = store.snapshot(queue, top=0) if known else None
    which = f"{queue} (key {digest})" if digest is not None else queue
    if snap is None or not (snap.waiting or snap.claimed or snap.undeliverable):
        click.echo(f"{queue}: no fair calls waiting")
        return
    if not yes:
        click.confirm(f"drop every fair call of {which} not yet published (waiting, claimed, undeliverable)? "
                      "they will never run", abort=True)
    with _as_cli_error():
        dropped = store.purge(queue, digest)
    click.echo(f"{which}: purged {dropped}")


@tuning.command(help="Effective concurrency settings per queue (as `celery worker -Q QUEUE` would get them) "
                     "and the profile of a worker started without -Q.")
@click.pass_context
def profiles(ctx: click.Context) -> None:
    from ..policy.profiles import ProfileConflict, choose_profile
    from .profiles import CONF_KEYS, configured_queues, profile_table

    runtime = _runtime(ctx)
    app = ctx.obj.app
    scale = float(runtime.config.concurrency_scale)
    scale_source = runtime.config.sources["tuning_concurrency_scale"]
    errors = 0
    for queue, name, settings in profile_table(runtime.config, str(app.conf.task_default_queue or "celery")):
        if name == "-":
            click.echo(f"{queue}: no profile (Celery's settings: pool {app.conf.worker_pool}, "
                       f"concurrency {app.conf.worker_concurrency or 'CPU count'}, "
                       f"prefetch {app.conf.worker_prefetch_multiplier}, acks_late {app.conf.task_acks_late})")
            continue
        if "error" in settings:
            click.echo(f"{queue}: {settings['error']}")
            errors += 1
            continue
        origin = "config" if name in runtime.config.profiles else "preset"
        parts = []
        for field in (*CONF_KEYS, "autoscale"):
            if field in settings:
                scaled = field in ("concurrency", "autoscale") and scale != 1.0
                note = f" (x{scale:g} from {scale_source})" if scaled else ""
                parts.append(f"{field} {settings[field]}{note}")
        limit = runtime.config.queue_concurrency.get(queue)
        if limit:
            parts.append(f"in-worker cap {limit}")
        click.echo(f"{queue}: profile {name} ({origin}): " + ", ".join(parts) + "; explicit worker flags win")
    queues = configured_queues(app)
    try:
        chosen, _ = choose_profile(queues, runtime.config.queue_profiles)
        click.echo(f"a worker without -Q consumes {', '.join(queues)}: "
                   + (f"profile {chosen}" if chosen else "no profile"))
    except ProfileConflict as exc:
        click.echo(f"a worker without -Q consumes {', '.join(queues)}: refuses to start ({exc})")
    if errors:
        raise click.ClickException(f"tuning_queue_profiles: {errors} queue(s) map to an unknown profile (above); "
                                   "workers refuse to start until that is fixed")


def render_cli_markdown() -> str:
    """docs/cli.md: every ``celery tuning`` command with its usage and options (from click)."""
    lines = ["# CLI reference", "",
             "Generated from the commands themselves by `python docs/generate_cli.py`; a test keeps it current.",
             "Every command is a sub-command of `celery -A proj`, registered through the `celery.commands`",
             "entry point, and reads the app's `tuning_*` settings.", ""]

    def walk(command: click.Command, path: list) -> None:
        ctx = click.Context(command, info_name=" ".join(path))
        if isinstance(command, click.Group):
            for name in sorted(command.commands):
                walk(command.commands[name], [*path, name])
            return
        lines.extend([f"## `celery -A proj {' '.join(path)}`", "", command.help or "", "", "```text",
                      command.get_usage(ctx).replace("Usage: ", "usage: celery -A proj ", 1)])
        for param in command.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record and record[0] != "--help":
                lines.append(f"  {record[0]:<28} {record[1]}".rstrip())
        lines.extend(["```", ""])

    walk(tuning, ["tuning"])
    lines.extend(["## `celery -A proj worker` options added by `install(app)`", "", "```text",
                  "  --without-tuning             Run tuned tasks as plain Celery tasks on this worker "
                  "(celery-tuning kill switch).",
                  "  --tuning-profile NAME        Concurrency profile for this worker (io, cpu, mixed or one of "
                  "tuning_profiles).", "```", ""])
    return "\n".join(lines).rstrip() + "\n"
