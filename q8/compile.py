"""Optional torch.compile of q8's elementwise maths into fused kernels.

Eager PyTorch runs each of quantize's steps (divide, round, shift, clamp, cast, rescale) as its
own pass over memory; compiled, a quantizer is one pass. `fused(fn)` compiles `fn` on first
use when compilation is on and falls back to eager for good (with one warning) if no compiler
works here. On by default on CUDA (Triton); on the CPU compiling every layer shape costs
about 90 s at start-up, so it is opt-in there: Q8_COMPILE=1 or `q8.set_compile(True)`
(Q8_COMPILE=0 turns it off everywhere).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from collections.abc import Callable

import torch

log = logging.getLogger("q8")
_state = {"enabled": None}  # None: decide from Q8_COMPILE and the machine


def set_compile(enabled: bool | None) -> None:
    """Turn fused (compiled) kernels on or off; None restores the automatic choice."""
    _state["enabled"] = enabled


def compile_enabled() -> bool:
    if _state["enabled"] is not None:
        return _state["enabled"]
    return _from_env(os.environ.get("Q8_COMPILE", "auto").lower())


@functools.lru_cache(maxsize=16)
def _from_env(env: str) -> bool:
    """Q8_COMPILE's meaning; cached: every quantizer call asks, and torch.cuda.is_available()
    alone costs microseconds."""
    if env in ("0", "false", "no", "off"):
        return False
    if env in ("1", "true", "yes", "on"):
        return True
    return torch.cuda.is_available()


def _python_dispatch_active() -> bool:
    """A TorchDispatchMode (a test's op counter, a profiler) cannot be traced into a graph."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def fused(fn: Callable) -> Callable:
    """`fn` compiled with torch.compile when enabled, eager otherwise or if compiling fails."""
    compiled: dict[str, Callable] = {}

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if torch.compiler.is_compiling():  # called from another fused function: inline it
            return fn(*args, **kwargs)
        if not compile_enabled() or "broken" in compiled or _python_dispatch_active():
            return fn(*args, **kwargs)
        try:
            if "fn" not in compiled:
                # one graph per static shape: q8 sees a few layer shapes, each compiled once
                limit = max(torch._dynamo.config.cache_size_limit, 64)
                torch._dynamo.config.cache_size_limit = limit
                compiled["fn"] = torch.compile(fn, dynamic=False, fullgraph=True)
            out = compiled["fn"](*args, **kwargs)
            compiled["worked"] = True
            return out
        except Exception as e:
            if "worked" not in compiled:  # never compiled here (no compiler?): eager for good
                compiled["broken"] = True
            if "warned" in compiled:
                return fn(*args, **kwargs)
            compiled["warned"] = True
            warnings.warn(f"q8: torch.compile failed for {fn.__name__} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); using eager kernels",
                          stacklevel=2)
            return fn(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
