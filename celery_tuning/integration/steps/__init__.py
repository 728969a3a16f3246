"""The pipeline's steps, one module per capability; importing the package registers them all.

Outermost first (``pipeline.STEP_ORDER``): :mod:`.fair`, :mod:`.debounce`, :mod:`.dedupe`, :mod:`.cache`,
:mod:`.breaker`, :mod:`.concurrency`, :mod:`.rate_limit`.
"""

from . import breaker, cache, concurrency, debounce, dedupe, fair, rate_limit  # noqa: F401  (each registers its step)
