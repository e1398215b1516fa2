"""q8's fused CPU kernels (q8/csrc/cpu_kernels.cpp): each layer's quantizer chain in one or
two passes over memory, in every core, with the rounding noise hashed in place.

Eager PyTorch runs each step of a quantizer as its own pass and its own dispatcher call, and
draws random numbers serially; torch.compile fuses them but costs more per call than it saves
on a CPU. These kernels are compiled once on first use by torch.utils.cpp_extension (a C++
compiler and ninja; ~15 s) and cached under TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions). Where they do not build, q8 warns once and runs its PyTorch ops.

Q8_CPU_KERNELS=0 turns them off (q8.cpu_kernels.set_enabled(False) in a process); they are
never used under torch.compile (Q8_COMPILE=1), which has its own fused kernels.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import warnings
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("q8")
SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
_state = {"enabled": None}  # None: from Q8_CPU_KERNELS (default on)


def set_enabled(enabled: bool | None) -> None:
    """Turn the CPU kernels on or off in this process; None restores Q8_CPU_KERNELS."""
    _state["enabled"] = enabled


def enabled() -> bool:
    if _state["enabled"] is not None:
        return _state["enabled"]
    return os.environ.get("Q8_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


@functools.cache
def load() -> object | None:
    """torch.ops.q8_cpu, compiled on first call; None (with one warning) where it cannot be."""
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    name = "q8_cpu_kernels"
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in (
            "AVX2", "AVX512"):
        flags, name = [*flags, "-mavx2"], name + "_avx2"
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level, path = cpp_log.level, os.environ.get("PATH", "")
    cpp_log.setLevel(logging.ERROR)  # "No CUDA runtime is found": irrelevant to CPU code
    try:
        try:  # cpp_extension runs `ninja` from PATH: the pip package's, if the venv is not on it
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        except ImportError:
            pass
        from torch.utils import cpp_extension

        log.info("q8: loading the CPU kernels (compiled on first use, then cached)")
        try:  # OpenMP, as PyTorch's own parallel_for on Linux; a compiler without it: 1 core
            cpp_extension.load(name=name, sources=[str(SOURCE)], is_python_module=False,
                               extra_cflags=[*flags, "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception:
            cpp_extension.load(name=name + "_serial", sources=[str(SOURCE)],
                               is_python_module=False, extra_cflags=flags)
        return torch.ops.q8_cpu
    except Exception as e:  # no compiler, no ninja, a read-only cache...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        warnings.warn(f"q8: the fused CPU kernels could not be built ({type(e).__name__}: "
                      f"{first}); using PyTorch ops, slower. Q8_CPU_KERNELS=0 silences this.",
                      stacklevel=3)
        return None
    finally:
        cpp_log.setLevel(level)
        os.environ["PATH"] = path


def usable(x: Tensor) -> bool:
    """Whether the kernels run for x: on, built, float32 (or uint8 codes) on a CPU, and not
    under torch.compile (whose own fused kernels serve the compiled path)."""
    from q8.compile import compile_enabled

    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.uint8) and enabled()
            and not compile_enabled() and not torch.compiler.is_compiling()
            and load() is not None)


def noise_args(noise: Tensor | None) -> tuple[int, bool]:
    """rounding_noise's result as the kernels take it: (hash seed, stochastic). With the
    kernels on, noise is a 0-d seed, or None for nearest rounding."""
    return (0, False) if noise is None else (int(noise), True)


def ops() -> object:
    """torch.ops.q8_cpu; call only after usable() said yes."""
    return torch.ops.q8_cpu
