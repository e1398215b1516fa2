"""Shared fixtures: the real Hydra configuration, composed and shrunk to a few CPU steps."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

# Without a GPU, q8's Triton kernels (backend `cuda`) run under Triton's interpreter on CPU
# tensors, so that their equivalence tests run everywhere. Set before q8.kernels.cuda is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

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


def _backends() -> list[str]:
    from q8.kernels import available

    return available()


BACKENDS = _backends()  # the q8 kernel backends that run here; each is built once, here
FAST_BACKENDS = [b for b in BACKENDS if not (b == "cuda" and not torch.cuda.is_available())]


def device_of(backend: str) -> str:
    """The device of the tensors that `backend` runs on here."""
    return "cuda" if backend == "cuda" and torch.cuda.is_available() else "cpu"


DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)]
                     if torch.cuda.is_available() else [])


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
    """pytest params of backend names; `cuda` on a GPU carries the `cuda` marker."""
    gpu = torch.cuda.is_available()
    return [pytest.param(n, marks=pytest.mark.cuda) if n == "cuda" and gpu else n
            for n in names]


@pytest.fixture(params=backend_params(FAST_BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    """Each kernel backend that runs here at speed (the interpreted `cuda` backend is checked
    op by op in tests/test_q8_kernels.py, too slowly for whole layers)."""
    return request.param


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
