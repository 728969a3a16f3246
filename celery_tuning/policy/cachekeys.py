"""Cache keys: canonical serialization of a call's bound arguments, hashed."""

from __future__ import annotations

import hashlib
import inspect
import json
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

__all__ = [
    "ArgumentBinder",
    "CallDigester",
    "UncacheableArgument",
    "call_digest",
    "canonical_arguments",
    "canonical_call",
]


class UncacheableArgument(TypeError):
    """An argument has no canonical form; the call runs uncached."""

    def __init__(self, argument: str, value: Any, message: str = "") -> None:
        self.argument = argument
        self.value_type = type(value).__name__
        super().__init__(message or f"argument {argument!r} ({self.value_type}) has no canonical JSON form")


_PLAIN = frozenset((str, int, bool, type(None)))

#: Keys of the one-entry objects that stand for values JSON has no form for. A caller's dict
#: of that same shape is wrapped in ``{"__dict__": ...}`` (and so is one already shaped like
#: the wrapper), which keeps the encoding injective: ``b"hi"`` and ``{"__bytes__": "6869"}``
#: are two calls, not one entry that either may poison. Other dicts keep their plain form, so
#: their keys, and the entries cached under them, stay what they were.
_SENTINELS = frozenset(("__bytes__", "__float__", "__dict__"))


def _canonical(name: str, value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return {"__float__": repr(value)}
        return value
    if isinstance(value, (list, tuple)):
        return [_canonical(name, v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise UncacheableArgument(name, value)
        canonical = {k: _canonical(name, v) for k, v in value.items()}
        if len(canonical) == 1 and next(iter(canonical)) in _SENTINELS:
            return {"__dict__": canonical}
        return canonical
    if isinstance(value, (bytes, bytearray)):
        return {"__bytes__": bytes(value).hex()}
    raise UncacheableArgument(name, value)


_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical_arguments(
    signature: inspect.Signature, args: Tuple[Any, ...], kwargs: Dict[str, Any],
    vary_on: Optional[Sequence[str]] = None,
) -> str:
    """One JSON text for a call, the same for positional and keyword forms (defaults applied).

    Raises:
        UncacheableArgument: Naming the first argument without a canonical form.
        TypeError: When the arguments do not fit the signature.
    """
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    items = bound.arguments
    if vary_on is not None:
        items = {k: v for k, v in items.items() if k in vary_on}
    canonical = {name: _canonical(name, value) for name, value in items.items()}
    return _dumps(canonical)


class ArgumentBinder:
    """Maps a call's arguments to ``{name: value}`` with defaults applied, like
    ``Signature.bind`` + ``apply_defaults`` but precomputed for the plain case (no
    ``*args``/``**kwargs``/positional-only parameters), where it is several times faster:
    keys are computed on every cached call, hits included.
    """

    def __init__(self, signature: inspect.Signature) -> None:
        self.signature = signature
        params = list(signature.parameters.values())
        plain = all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)
        self.fast = plain
        self.positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
        self.names = frozenset(p.name for p in params)
        self.defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self.required = frozenset(p.name for p in params if p.default is p.empty)

    def bind(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if not self.fast or len(args) > len(self.positional):
            bound = self.signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return dict(bound.arguments)
        out = dict(self.defaults)
        out.update(zip(self.positional, args))
        for name, value in kwargs.items():
            if name not in self.names or name in self.positional[:len(args)]:
                # unknown or given twice: let Signature.bind raise its usual TypeError
                self.signature.bind(*args, **kwargs)
            out[name] = value
        if not self.required.issubset(out):
            self.signature.bind(*args, **kwargs)
        return out


def canonical_call(binder: ArgumentBinder, args: Tuple[Any, ...], kwargs: Dict[str, Any],
                   vary_on: Optional[Sequence[str]] = None) -> str:
    """:func:`canonical_arguments` through a precomputed :class:`ArgumentBinder`."""
    items = binder.bind(args, kwargs)
    if vary_on is not None:
        items = {k: v for k, v in items.items() if k in vary_on}
    canonical = {name: value if type(value) in _PLAIN else _canonical(name, value) for name, value in items.items()}
    return _dumps(canonical)


def call_digest(text: str) -> str:
    """SHA-256 of the canonical text (hex)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def key_function_digest(key: Callable[..., Any], args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
    """Digest of a user key function's result, in the arguments' canonical encoding.

    ``str()`` of the result would give ``1`` and ``"1"``, or ``("a", "b")`` and ``"('a', 'b')"``,
    one entry that either call could poison; the canonical JSON tells them apart.

    Raises:
        UncacheableArgument: When the result has no canonical form (the call runs uncached).
    """
    result = key(*args, **kwargs)
    try:
        canonical = _canonical("key", result)
    except UncacheableArgument as exc:  # named for what the user wrote: a key function, not an argument
        raise UncacheableArgument("key", result, f"the key function returned a value holding a {exc.value_type}, "
                                  "which has no canonical JSON form") from None
    return call_digest("k:" + _dumps(canonical))


#: Digests of recent calls whose arguments are all short strings, so a hit skips binding,
#: canonical JSON and SHA-256. Only ``str`` arguments qualify: for them equal means identical
#: canonical text, unlike 1 == True == 1.0. Bounded in entries and in the text it keeps alive.
MEMO_ENTRIES = 4096
MEMO_TEXT = 256


def _memo_key(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    size = 0
    for value in args:
        if type(value) is not str:
            return None
        size += len(value)
    if kwargs:
        for value in kwargs.values():
            if type(value) is not str:
                return None
            size += len(value)
        if size > MEMO_TEXT:
            return None
        return args, tuple(sorted(kwargs.items()))
    if size > MEMO_TEXT:
        return None
    return args


class CallDigester:
    """The key function of one cached task: a call's arguments to the digest its entries live under.

    The digest of ``key(*args, **kwargs)`` when a key function is given, else of the canonical
    call (bound to ``signature``, defaults applied, only ``vary_on`` names when given). Calls
    whose arguments are all short strings are memoized (see :data:`MEMO_TEXT`).
    """

    def __init__(self, signature: inspect.Signature, key: Optional[Callable[..., Any]] = None,
                 vary_on: Optional[Sequence[str]] = None) -> None:
        self.binder = ArgumentBinder(signature)
        self.key = key
        self.vary_on = tuple(vary_on) if vary_on is not None else None
        self.memo: Dict[Any, str] = {}

    def __call__(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> str:
        """Digest of a call's arguments.

        Raises:
            UncacheableArgument: When an argument has no canonical form.
        """
        if self.key is not None:
            return key_function_digest(self.key, args, kwargs)
        memo = _memo_key(args, kwargs)
        if memo is not None:
            found = self.memo.get(memo)
            if found is not None:
                return found
        digest = call_digest(canonical_call(self.binder, args, kwargs, self.vary_on))
        if memo is not None:
            if len(self.memo) >= MEMO_ENTRIES:
                self.memo.clear()
            self.memo[memo] = digest
        return digest
