"""Shared fixtures: the real Hydra configuration, composed and shrunk to a few CPU steps; the
kernel backends, each built when the first test that names it runs."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"

# A run of a few steps: tiny images and batches, no progress bar, CSV logs.
TINY = [
    "logger=csv",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]
TINY_DIGITS = ["data.image_size=16", "data.batch_size=16"]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """conf/train.yaml with `overrides`, set up as Hydra would for a run in `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a real run, the job's config has no `hydra` node
    return cfg


GPU = torch.cuda.is_available()
# Every q8 kernel backend. A test names its backends through backend_params (or the
# `q8_backend` marker); each is built when the first such test runs, and a test whose backend
# cannot run here (no C++ compiler for `cpu`, no Triton for `cuda`) is skipped, saying why.
BACKENDS = ["reference", "cpu", "cuda"]
# Those that run at speed: without a GPU `cuda` runs under Triton's interpreter, too slowly for
# whole layers; tests/test_q8_kernels.py checks it op by op.
FAST_BACKENDS = [b for b in BACKENDS if b != "cuda" or GPU]


def device_of(backend: str) -> str:
    """The device of the tensors that `backend` runs on here."""
    return "cuda" if backend == "cuda" and GPU else "cpu"


DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if GPU else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """The CPU, and a GPU where there is one (those cases carry the `cuda` marker). On a GPU
    fp32 GEMMs run in true fp32 here (no TF32), so that bounds from fp32's rounding hold."""
    if request.param == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        yield "cuda"
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    else:
        yield "cpu"


def backend_params(names: list[str]) -> list:
    """pytest params of backend names, each marked `q8_backend` (built before the test runs,
    skipped where it cannot run); `cuda` on a GPU also carries the `cuda` marker."""
    return [pytest.param(n, marks=[pytest.mark.q8_backend(n)]
                         + ([pytest.mark.cuda] if n == "cuda" and GPU else []))
            for n in names]


@pytest.fixture(params=backend_params(FAST_BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """Each kernel backend that runs here at speed."""
    return request.param


@contextlib.contextmanager
def triton_interpreter() -> Iterator[None]:
    """Without a GPU, TRITON_INTERPRET=1 inside the block: Triton's interpreter runs q8's `cuda`
    kernels on CPU tensors. q8.kernels.cuda reads it when imported (`triton.jit` then makes
    interpreted functions), Triton while the kernels run."""
    if GPU:
        yield
        return
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


# triton.jit reads TRITON_INTERPRET when it decorates a function, Triton's own standard library
# (tl.zeros, tl.sum...) included, which is decorated when triton is first imported: so without a
# GPU, Triton is imported here, before any test imports it (torch.compile does), inside the block.
if not GPU and importlib.util.find_spec("triton") is not None:
    with triton_interpreter():
        importlib.import_module("triton.language")


def cuda_kernels() -> ModuleType:
    """q8.kernels.cuda, imported as the `cuda` backend runs here (interpreted without a GPU).
    Tests import it through this function, never directly: a first import outside the
    interpreter would leave the module unable to run on this machine's CPU tensors."""
    with triton_interpreter():
        module = importlib.import_module("q8.kernels.cuda")
    if not (GPU or module.INTERPRET):
        pytest.fail("q8.kernels.cuda was imported outside tests.conftest.cuda_kernels(), "
                    "without Triton's interpreter: the `cuda` cases cannot run here")
    return module


@pytest.fixture(autouse=True)
def _kernel_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """Builds the backend that a test's `q8_backend` marker names, or skips the test with the
    reason it cannot run here; the `cuda` backend's tests run inside triton_interpreter()."""
    marker = request.node.get_closest_marker("q8_backend")
    if marker is None:
        yield
        return
    from q8.kernels import BackendUnavailable, load

    name = marker.args[0]
    scope = triton_interpreter() if name == "cuda" else contextlib.nullcontext()
    with scope:
        try:
            if name == "cuda":
                cuda_kernels()
            load(name)
        except (BackendUnavailable, ImportError) as ex:
            pytest.skip(f"backend {name!r} does not run here: {ex}")
        yield


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., DictConfig]:
    """A factory: tiny_config(*overrides, run_dir=...) -> the shrunk, composed config."""

    def make(*overrides: str, run_dir: Path | None = None) -> DictConfig:
        data = [] if any(o.startswith("data=") for o in overrides) else TINY_DIGITS
        return compose_config([*TINY, *data, *overrides], output_dir=run_dir or tmp_path / "run")

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture
def load_script() -> Callable[[str], ModuleType]:
    """load_script("compare_runs") -> scripts/compare_runs.py imported as a module."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return load
