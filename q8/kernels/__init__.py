"""q8's kernels: one interface, three backends, chosen once per model.

The interface is `q8.kernels.interface.Backend`: the ops that q8's autograd functions call
(an input's codes and x_hat, the weights' W_hat, the g_l pair, ReLU and max-pool with their
compact masks, Range BN's passes, dequantize). Backends:

- `reference`: plain PyTorch, the paper's maths; any device. The oracle of every test.
- `cpu`: fused C++ kernels for CPU tensors, built on first use (needs a C++ compiler).
- `cuda`: fused Triton kernels for CUDA tensors.

A fused backend runs the calls its kernels take and hands the rest to the reference, by one
rule (`q8.kernels.interface.Fused.fuses`).

`QuantConfig.backend` names one, or `auto`: per device type, `cuda` for CUDA tensors, `cpu` for
CPU tensors where the C++ kernels build (else `reference`, with one warning) and `reference`
elsewhere. `quantize_model` gives every layer one `Kernels`; a backend is built when a layer
first runs on its device, so a GPU run never compiles the CPU kernels. Every backend draws the
same noise (reference.uniform), so a seeded run is the same on each.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from torch import Tensor, nn

from q8.kernels.interface import Backend
from q8.kernels.reference import Reference

BACKENDS = ("auto", "reference", "cpu", "cuda")
MAX_NUMEL = 2**31 - 1  # elements of one tensor: the most that q8's kernels are tested to index


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here (no compiler for `cpu`, no GPU or Triton for `cuda`)."""


_loaded: dict[str, Backend | BackendUnavailable] = {}


def _build(name: str) -> Backend:
    if name == "reference":
        return Reference()
    if name == "cpu":
        from q8.kernels.cpu import Cpu

        try:
            return Cpu()
        except Exception as e:  # no compiler, no ninja, a read-only cache...
            raise BackendUnavailable(
                f"backend 'cpu': q8's C++ kernels could not be built "
                f"({type(e).__name__}: {_first_line(e)})") from e
    try:
        from q8.kernels.cuda import Cuda
    except ImportError as e:
        raise BackendUnavailable(f"backend 'cuda' needs Triton ({e})") from e
    return Cuda()  # raises BackendUnavailable without a GPU


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def load(name: str) -> Backend:
    """The backend `name`, built on the first call (a failure is remembered, not retried);
    raises BackendUnavailable with the reason."""
    if name not in BACKENDS[1:]:
        raise ValueError(f"backend={name!r} is invalid: valid choices are {', '.join(BACKENDS)}")
    if name not in _loaded:
        try:
            _loaded[name] = _build(name)
        except BackendUnavailable as e:
            _loaded[name] = e
    backend = _loaded[name]
    if isinstance(backend, BackendUnavailable):
        raise backend
    return backend


def available() -> list[str]:
    """The backends that run here (each is built to find out)."""
    names = []
    for name in BACKENDS[1:]:
        with contextlib.suppress(BackendUnavailable):
            load(name)
            names.append(name)
    return names


class Kernels:
    """The backend of one quantized model: `backend` resolved once per device type.

    `on(x)` is the backend for x's device. An explicit backend is built at construction
    (BackendUnavailable if it cannot run here); `auto` builds each device's choice on first use.
    """

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(
                f"backend={backend!r} is invalid: valid choices are {', '.join(BACKENDS)}")
        self.backend = backend
        self._fixed = None if backend == "auto" else load(backend)
        self._by_device: dict[str, Backend] = {}

    def on(self, x: Tensor) -> Backend:
        if x.numel() > MAX_NUMEL:
            raise ValueError(
                f"q8: a tensor of {x.numel():,} elements {tuple(x.shape)} is more than q8's "
                f"kernels index (2^31 - 1); use a smaller batch")
        try:
            return self._by_device[x.device.type]
        except KeyError:
            backend = self._by_device[x.device.type] = self._resolve(x)
            return backend

    def _resolve(self, x: Tensor) -> Backend:
        if self._fixed is not None:
            if not self._fixed.serves(x):
                raise ValueError(
                    f"q8: backend {self.backend!r} does not run on {x.device.type} tensors; "
                    f"use backend 'auto' or 'reference'")
            return self._fixed
        preferred = {"cpu": "cpu", "cuda": "cuda"}.get(x.device.type, "reference")
        try:
            return load(preferred)
        except BackendUnavailable as e:
            warnings.warn(f"q8: {e}; using the reference backend, slower. "
                          f"quant.backend=reference silences this.", stacklevel=4)
            return load("reference")

    def __reduce__(self) -> tuple:
        return Kernels, (self.backend,)

    def __repr__(self) -> str:
        return f"Kernels({self.backend!r})"


@contextlib.contextmanager
def use_backend(model: nn.Module, backend: str) -> Iterator[None]:
    """Within the block, every q8 layer of `model` runs on `backend` (e.g. a check on the CPU
    that should not build the C++ kernels)."""
    kernels = Kernels(backend)
    layers = [m for m in model.modules() if hasattr(m, "q8_kernels")]
    saved = [m.q8_kernels for m in layers]
    for m in layers:
        m.q8_kernels = kernels
    try:
        yield
    finally:
        for m, k in zip(layers, saved):
            m.q8_kernels = k
