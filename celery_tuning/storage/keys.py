"""Every Redis key and pub/sub channel name celery-tuning uses, built in one place.

``P`` is ``tuning_key_prefix`` (default ``tuning``); ``{N}`` is the entity's name as its Cluster
hash tag (see :func:`hash_tag`), so every key of one limiter, breaker, lease set or cache lives in
one slot and a script touching several of them never fails with CROSSSLOT. The formats are part
of deployed data (and of ``docs/upgrading.md``): change one only with an upgrade note.

=================================================  =========  ====================================
key or channel                                     type       built by
=================================================  =========  ====================================
``P:rl:{N}``                                       string     :func:`rate_limit_stem` (shared
                                                              bucket of limiter ``N``)
``P:rl:{N}:k:<sha256[:24]>``                       string     :func:`rate_limit_bucket_key` (a
                                                              per-key bucket)
``P:rl:{N}:conf``                                  hash       :func:`rate_limit_conf_key` (run-time
                                                              override, adaptive factor)
``P:cb:{N}``                                       hash       :func:`breaker_key`
channel ``P:cb:failures``                          pub/sub    :func:`breaker_channel` (every
                                                              recorded failure: the breaker key)
``P:cc:{N}``                                       zset       :func:`lease_key` (concurrency
                                                              leases of limit ``N``)
``P:cc:{N}:k:<sha256[:24]>``                       zset       :func:`lease_key` (the leases of one
                                                              caller key of limit ``N``)
``P:cache:{T}``                                    (stem)     :func:`cache_stem` (task ``T``)
``P:cache:{T}:gen``                                string     :func:`cache_generation_key`
``P:cache:{T}:v<version>:g<gen>:<sha256>``         string     :func:`cache_value_key`
``P:cache:{T}:v<version>:g<gen>:<sha256>:lock``    string     :func:`cache_lock_key` (single flight)
channel ``P:cache:invalidate``                     pub/sub    :func:`cache_invalidation_channel`
``P:park:{N}:<r>``                                 (stem)     :func:`park_stem` (parked tasks of one
                                                              spot: reason code ``<r>`` = ``rl`` |
                                                              ``cc`` | ``cb``, name ``N``)
``P:park:{N}:<r>:due``                             zset       :func:`park_keys` (park id -> due, µs)
``P:park:{N}:<r>:wait``                            zset       :func:`park_keys` (FIFO waiters: park
                                                              id -> first-park sequence, µs)
``P:park:{N}:<r>:msg``                             hash       :func:`park_keys` (park id -> payload)
``P:park:{N}:<r>:claim``                           zset       :func:`park_keys` (park id -> claim
                                                              expiry, µs)
``P:park:{N}:<r>:tix``                             hash       :func:`park_keys` (park id -> ticket
                                                              ``<pub>`` or ``<pub>:r``)
``P:park:{N}:<r>:tixat``                           zset       :func:`park_keys` (park id -> when its
                                                              ticket may be dropped, µs)
``P:park:{N}:<r>:pub``                             zset       :func:`park_handover_keys` (park id ->
                                                              expiry, µs: published, not arrived)
``P:park:{N}:<r>:standby``                         zset       :func:`park_handover_keys` (standby
                                                              token -> expiry, µs; concurrency)
``P:park:{N}:cc:k:<sha256[:24]>:<part>``           (same)     :func:`park_keys` of spot
                                                              (``concurrency``, ``N:k:<sha256[:24]>``):
                                                              the waiters of one caller key
``P:park:{N}:cc:keys``                             set        :func:`park_key_index_key` (digests
                                                              of limit ``N``'s caller keys whose
                                                              spot holds parked or claimed entries)
``P:park:index``                                   set        :func:`park_index_key` (``<r>:<N>``
                                                              of every spot that may hold entries;
                                                              ``ck:<N>`` once for a limit whose
                                                              caller keys park)
channel ``P:park:wake``                           pub/sub    :func:`park_wake_channel` (a release
                                                              made a waiter due: movers wake)
channel ``P:park:standby``                        pub/sub    :func:`park_standby_channel` (a lease
                                                              released while a standby waits)
``P:dd:{T}:l:<digest>``                            hash       :func:`dedupe_lock_key` (one
                                                              ``@dedupe`` lock of task ``T``)
``P:dd:{T}:idx``                                   zset       :func:`dedupe_index_key` (digest ->
                                                              lock expiry, µs)
``P:db:{T}:due``                                   zset       :func:`debounce_keys` (``@debounce``
                                                              key digest -> next look, µs)
``P:db:{T}:runs``                                  hash       :func:`debounce_keys` (a key's
                                                              pending and in-flight runs)
``P:db:{T}:tix``                                   hash       :func:`debounce_keys` (task id ->
                                                              ticket ``<pub>`` or ``<pub>:r``)
``P:db:{T}:tixat``                                 zset       :func:`debounce_keys` (task id ->
                                                              when its ticket may go, µs)
``P:fq:{Q}:<part>``                                 various    :func:`fair_keys` (``@fair`` messages of
                                                              queue ``Q``: ring, msg, own, claim, win,
                                                              tix, tixat, kw, kc, wk, wkc, stat, line,
                                                              dead)
``P:fq:{Q}:p:<digest>``                            zset       :func:`fair_key_list` (a capped key's
                                                              released ids -> expiry, µs)
``P:fq:index``                                     set        :func:`fair_index_key` (queues that
                                                              may hold fair messages)
``P:<part>:<part>…``                               any        :func:`prefixed_key` (anything else
                                                              under the prefix)
=================================================  =========  ====================================
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, NamedTuple, Optional, Tuple

from ..errors import ConfigurationError

__all__ = [
    "DEBOUNCE",
    "PARK_REASONS",
    "DebounceKeys",
    "FairKeys",
    "ParkHandoverKeys",
    "ParkKeys",
    "breaker_channel",
    "breaker_key",
    "cache_generation_key",
    "cache_invalidation_channel",
    "cache_lock_key",
    "cache_stem",
    "cache_value_key",
    "debounce_keys",
    "dedupe_index_key",
    "dedupe_lock_key",
    "dedupe_stem",
    "fair_index_key",
    "fair_key_list",
    "fair_keys",
    "hash_tag",
    "key_digest",
    "keyed_spot_name",
    "lease_key",
    "park_handover_keys",
    "park_index_key",
    "park_index_member",
    "park_key_index_key",
    "park_keyed_index_member",
    "park_keyed_limit_of",
    "park_keys",
    "park_reason_code",
    "park_spot_of",
    "park_standby_channel",
    "park_stem",
    "park_wake_channel",
    "prefixed_key",
    "rate_limit_bucket_key",
    "rate_limit_conf_key",
    "rate_limit_stem",
    "split_keyed_spot",
]

#: The ``kind`` part of each entity's keys.
RATE_LIMIT, BREAKER, LEASE, CACHE = "rl", "cb", "cc", "cache"
PARK = "park"


def hash_tag(prefix: str, kind: str, name: str) -> str:
    """Key stem whose ``{...}`` part pins every key of one entity to one Cluster slot.

    Redis Cluster hashes what lies between the first ``{`` and the next ``}``, or the whole key
    when that is empty: a name starting with ``}`` (or empty) would spread one limiter's keys over
    several slots (CROSSSLOT). A name with no braces is its own tag, so keys stay readable; any
    other name is percent-escaped behind an extra ``{``, which no plain name's tag starts with, so
    two names never share a key.

    Raises:
        ConfigurationError: When ``prefix`` is empty or holds a brace (Redis would take the tag from it).
    """
    if "{" in prefix or "}" in prefix or not prefix:
        raise ConfigurationError(
            f"key prefix={prefix!r}: must be a non-empty string without braces (Redis Cluster "
            "would read them as the hash tag)")
    if name and "{" not in name and "}" not in name:
        return f"{prefix}:{kind}:{{{name}}}"
    escaped = name.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return f"{prefix}:{kind}:{{{{{escaped}}}"


def prefixed_key(prefix: str, *parts: str) -> str:
    """``prefix:part:part…``: a key under the prefix that belongs to no named entity."""
    return ":".join((prefix, *parts))


# -- rate limits (gcra_*.lua) ----------------------------------------------------------------

def rate_limit_stem(prefix: str, name: str) -> str:
    """Limiter ``name``'s shared bucket, and the stem of its other keys."""
    return hash_tag(prefix, RATE_LIMIT, name)


def rate_limit_bucket_key(prefix: str, name: str, key_hash: Optional[str] = None) -> str:
    """The bucket of one caller key (``key_hash``: its digest), or the shared one without."""
    stem = rate_limit_stem(prefix, name)
    return f"{stem}:k:{key_hash}" if key_hash else stem


def rate_limit_conf_key(prefix: str, name: str) -> str:
    """Limiter ``name``'s override and adaptive-factor hash (shared by all its buckets)."""
    return f"{rate_limit_stem(prefix, name)}:conf"


# -- circuit breakers (breaker.lua) ----------------------------------------------------------

def breaker_key(prefix: str, name: str) -> str:
    """Breaker ``name``'s state hash."""
    return hash_tag(prefix, BREAKER, name)


def breaker_channel(prefix: str) -> str:
    """The channel every recorded breaker failure is announced on (message: the breaker key)."""
    return prefixed_key(prefix, BREAKER, "failures")


# -- concurrency limits (lease_*.lua) --------------------------------------------------------

def key_digest(value: Any) -> str:
    """Bounded, opaque id of a caller key (``str(value)``'s sha256, 24 hex digits): the raw key
    never reaches Redis. The same digest as a per-key rate-limit bucket's.

    Raises :class:`~celery_tuning.errors.ConfigurationError` naming ``key=`` when ``str(value)``
    would differ between processes for the same key (an object printed with its address, a set
    printed in its hash order): every process would count that tenant apart, silently.
    """
    if type(value) is not str:
        _check_stable(value)
    return hashlib.sha256(str(value).encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _check_stable(value: Any, depth: int = 0) -> None:
    kind = type(value)
    if isinstance(value, (set, frozenset)) or (kind.__str__ is object.__str__ and kind.__repr__ is object.__repr__):
        raise ConfigurationError(
            f"key=: the key function returned a {kind.__name__}, whose str() differs between processes "
            f"({'hash order' if isinstance(value, (set, frozenset)) else 'it shows its address'}); "
            "return a str or an int (or a tuple of them)")
    if depth < 4 and isinstance(value, (tuple, list)):
        for item in value:
            _check_stable(item, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            _check_stable(item, depth + 1)


def lease_key(prefix: str, name: str, key_hash: Optional[str] = None) -> str:
    """Concurrency limit ``name``'s sorted set of leases; with ``key_hash`` (:func:`key_digest`),
    the set of that caller key (same hash tag: one Cluster slot with the limit's park spots)."""
    stem = hash_tag(prefix, LEASE, name)
    return f"{stem}:k:{key_hash}" if key_hash else stem


_KEYED_SPOT = re.compile(r"(?s)(.+):k:([0-9a-f]{24})")


def keyed_spot_name(name: str, key_hash: Optional[str]) -> str:
    """The parking spot name of concurrency limit ``name``'s waiters of one caller key
    (``<name>:k:<digest>``), or ``name`` without a key."""
    return f"{name}:k:{key_hash}" if key_hash else name


def split_keyed_spot(name: str) -> Tuple[str, Optional[str]]:
    """(limit name, key digest or None) of a concurrency spot name (:func:`keyed_spot_name`)."""
    found = _KEYED_SPOT.fullmatch(name)
    return (found.group(1), found.group(2)) if found else (name, None)


# -- result cache (cache_*.lua) --------------------------------------------------------------

def cache_stem(prefix: str, task_name: str) -> str:
    """The stem of every cache key of task ``task_name``."""
    return hash_tag(prefix, CACHE, task_name)


def cache_generation_key(prefix: str, task_name: str) -> str:
    """Task ``task_name``'s cache generation counter."""
    return f"{cache_stem(prefix, task_name)}:gen"


def cache_value_key(stem: str, version: int, generation: int, digest: str) -> str:
    """One cached result under ``stem`` (:func:`cache_stem`)."""
    return f"{stem}:v{version}:g{generation}:{digest}"


def cache_lock_key(stem: str, version: int, generation: int, digest: str) -> str:
    """The single-flight lock of one cached result."""
    return f"{cache_value_key(stem, version, generation, digest)}:lock"


def cache_invalidation_channel(prefix: str) -> str:
    """The channel cache invalidations and clears are published on."""
    return prefixed_key(prefix, CACHE, "invalidate")


# -- parked tasks (park_*.lua) ---------------------------------------------------------------

#: A parking reason and the code its keys and index members carry.
PARK_REASONS = {"rate_limit": RATE_LIMIT, "concurrency": LEASE, "circuit_open": BREAKER}
_PARK_REASON_OF_CODE = {code: reason for reason, code in PARK_REASONS.items()}
#: The index code of a limit whose caller keys park (:func:`park_keyed_index_member`).
KEYED_CODE = "ck"


class ParkKeys(NamedTuple):
    """The keys of one parking spot, in the order every ``park_*.lua`` script receives them."""

    due: str
    wait: str
    msg: str
    claim: str
    tix: str
    tixat: str


def park_reason_code(reason: str) -> str:
    """``rl`` | ``cc`` | ``cb`` for ``rate_limit`` | ``concurrency`` | ``circuit_open``.

    Raises:
        ConfigurationError: For any other reason.
    """
    try:
        return PARK_REASONS[reason]
    except KeyError:
        raise ConfigurationError(
            f"parking reason {reason!r}: must be one of {', '.join(sorted(PARK_REASONS))}") from None


def park_stem(prefix: str, reason: str, name: str) -> str:
    """The stem of spot (``reason``, ``name``): same hash tag as the limiter, lease set and breaker ``name``.

    A concurrency spot of one caller key (:func:`keyed_spot_name`) takes its limit's hash tag, so its
    scripts may touch the key's lease set (:func:`lease_key`) in one Cluster slot."""
    code = park_reason_code(reason)
    if reason == "concurrency":
        limit, key_hash = split_keyed_spot(name)
        if key_hash:
            return f"{hash_tag(prefix, PARK, limit)}:{code}:k:{key_hash}"
    return f"{hash_tag(prefix, PARK, name)}:{code}"


def park_keys(prefix: str, reason: str, name: str) -> ParkKeys:
    """Every key of one spot (one Cluster slot)."""
    stem = park_stem(prefix, reason, name)
    return ParkKeys(*(f"{stem}:{part}" for part in ParkKeys._fields))


class ParkHandoverKeys(NamedTuple):
    """A spot's keys for the hand-over of concurrency slots; every ``park_*.lua`` script receives
    them right after the :class:`ParkKeys` (KEYS[7], KEYS[8])."""

    #: zset park id -> expiry (µs): published by a mover, not yet arrived at a worker.
    pub: str
    #: zset standby token -> expiry (µs): woken waiters holding on in a worker for the next slot.
    standby: str


def park_handover_keys(prefix: str, reason: str, name: str) -> ParkHandoverKeys:
    """The spot's :class:`ParkHandoverKeys` (the same Cluster slot as :func:`park_keys`)."""
    stem = park_stem(prefix, reason, name)
    return ParkHandoverKeys(*(f"{stem}:{part}" for part in ParkHandoverKeys._fields))


def park_index_key(prefix: str) -> str:
    """The set of spots that may hold parked entries (a hint for movers; its own slot)."""
    return prefixed_key(prefix, PARK, "index")


def park_wake_channel(prefix: str) -> str:
    """The channel a release publishes on when it makes a concurrency waiter due (movers wake)."""
    return prefixed_key(prefix, PARK, "wake")


def park_standby_channel(prefix: str) -> str:
    """The channel a lease release publishes its spot's index member on while a standby waits."""
    return prefixed_key(prefix, PARK, "standby")


def park_key_index_key(prefix: str, reason: str, name: str) -> str:
    """The set of caller-key digests of spot (``reason``, ``name``)'s limit whose spots hold parked or
    claimed entries (same hash tag as the limit, so the scripts of a caller key's spot keep it in the
    same Cluster slot). Every ``park_*.lua`` script receives it as KEYS[9]; only the spots of a caller
    key (:func:`keyed_spot_name`) ever write it, so the movers visit the keys with entries, not every
    key that ever parked."""
    limit = split_keyed_spot(name)[0] if reason == "concurrency" else name
    return f"{hash_tag(prefix, PARK, limit)}:{park_reason_code(reason)}:keys"


def park_keyed_index_member(limit: str) -> str:
    """``ck:<limit>``: the one member of :func:`park_index_key` for every caller key of concurrency
    limit ``limit`` (their spots are listed from :func:`park_key_index_key`)."""
    return f"{KEYED_CODE}:{limit}"


def park_keyed_limit_of(member: str) -> Optional[str]:
    """The limit of a :func:`park_keyed_index_member`, or None for any other member."""
    code, sep, limit = member.partition(":")
    return limit if sep and code == KEYED_CODE else None


def park_index_member(reason: str, name: str) -> str:
    """``<r>:<name>``: one spot's member of :func:`park_index_key`."""
    return f"{park_reason_code(reason)}:{name}"


def park_spot_of(member: str) -> Optional[Tuple[str, str]]:
    """(reason, name) of an index member, or None when it is not one (the code has no colon)."""
    code, sep, name = member.partition(":")
    reason = _PARK_REASON_OF_CODE.get(code)
    return (reason, name) if sep and reason is not None else None


# -- publish once: @dedupe locks and @debounce runs (one hash tag per task) ------------------------

def dedupe_stem(prefix: str, task: str) -> str:
    """The stem of every dedupe key of task ``task``."""
    return hash_tag(prefix, "dd", task)


def dedupe_lock_key(prefix: str, task: str, digest: str) -> str:
    """The lock of one key of task ``task``."""
    return f"{dedupe_stem(prefix, task)}:l:{digest}"


def dedupe_index_key(prefix: str, task: str) -> str:
    """Task ``task``'s index of locks (digest -> expiry, µs)."""
    return f"{dedupe_stem(prefix, task)}:idx"


#: The ``kind`` part of the debounce keys: ``P:db:{T}:…``.
DEBOUNCE = "db"


class DebounceKeys(NamedTuple):
    """One debounced task's keys, in the order every ``debounce_*.lua`` script receives them."""

    #: zset key digest -> when a mover looks at the key next (µs).
    due: str
    #: hash ``<digest>:<field>`` -> the key's pending and in-flight runs.
    runs: str
    #: hash task id -> ticket ``<pub>`` or ``<pub>:r``.
    tix: str
    #: zset task id -> when its ticket may go (µs).
    tixat: str


def debounce_keys(prefix: str, task: str) -> DebounceKeys:
    """Every key of debounced task ``task`` (one Cluster slot: the task name is the hash tag)."""
    stem = hash_tag(prefix, DEBOUNCE, task)
    return DebounceKeys(*(f"{stem}:{part}" for part in DebounceKeys._fields))


# -- fair queues (@fair): one hash tag per queue --------------------------------------------------

#: The ``kind`` part of the fair-queue keys: ``P:fq:{Q}:…``.
FAIR = "fq"


class FairKeys(NamedTuple):
    """One queue's fair-queue keys, in the order every ``fair_*.lua`` script receives them."""

    #: list of key digests with waiting messages, in round-robin order (each at most once).
    ring: str
    #: hash message id -> payload (JSON), while waiting or claimed.
    msg: str
    #: hash message id -> its key digest, while waiting or claimed.
    own: str
    #: zset message id -> claim expiry (µs): claimed by a dispatcher, not yet acknowledged.
    claim: str
    #: zset message id -> window expiry (µs): released, not started by a worker yet.
    win: str
    #: hash message id -> ticket ``<pub>`` or ``<pub>:r``.
    tix: str
    #: zset message id -> when its ticket may go (µs).
    tixat: str
    #: hash key digest -> weight (absent: 1).
    kw: str
    #: hash key digest -> ``<cap> <lease set>``: the key's concurrency cap and lease set.
    kc: str
    #: zset consumer node -> when its registration lapses (µs).
    wk: str
    #: hash consumer node -> its capacity (concurrency x prefetch).
    wkc: str
    #: hash ``n`` waiting messages, ``r`` released in total.
    stat: str
    #: hash: each key's FIFO of waiting message ids (``<digest>:<n>`` -> id, ``<digest>:h`` and
    #: ``<digest>:t`` its head and tail positions; see ``fair_line.lua``). One key for every fair
    #: key of the queue: the waiting ids expire with the rest of the queue, never apart from it.
    line: str
    #: zset message id -> when it was set aside (µs): undeliverable (see ``fair_reject.lua``).
    dead: str


def fair_keys(prefix: str, queue: str) -> FairKeys:
    """Every fixed key of fair queue ``queue`` (one Cluster slot: the queue name is the hash tag)."""
    stem = hash_tag(prefix, FAIR, queue)
    return FairKeys(*(f"{stem}:{part}" for part in FairKeys._fields))


def fair_key_list(prefix: str, queue: str, digest: str, part: str = "p") -> str:
    """Capped fair key ``digest``'s set of released ids (``part="p"``); the scripts build the same
    name from the stem (``:p:`` + digest). (Waiting ids are in the queue's ``line`` hash.)"""
    return f"{hash_tag(prefix, FAIR, queue)}:{part}:{digest}"


def fair_index_key(prefix: str) -> str:
    """The set of queues that may hold fair messages (a hint for dispatchers; its own slot)."""
    return prefixed_key(prefix, FAIR, "index")
