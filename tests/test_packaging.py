"""Packaging: the library installs and imports without the application's dependencies."""

from __future__ import annotations

import subprocess
import sys

import tomllib

from tests.conftest import ROOT

APP_ONLY = ["lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "timm",
            "torchvision", "sklearn", "matplotlib", "pandas"]


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0]


def test_the_library_requires_torch_and_ninja_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(_name(r).strip() for r in project["dependencies"]) == ["ninja", "torch"]
    app = {_name(r).strip() for r in project["optional-dependencies"]["app"]}
    assert {"lightning", "hydra-core", "wandb", "timm"} <= app
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert packages["packages"]["find"]["include"] == ["q8", "q8.*"]  # no top-level `callbacks`


def test_q8_quantizes_and_trains_a_model_with_the_app_dependencies_unimportable():
    """`import q8` and a quantized training step, in a process where importing any of the
    application's dependencies fails (as after `pip install q8`)."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {APP_ONLY!r}:
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import torch
import q8
model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 3))
q8.quantize_model(model, q8.QuantConfig())
loss = model(torch.randn(8, 1, 8, 8)).square().mean()
loss.backward()
assert all(p.grad is not None for p in model.parameters())
print(model)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "QuantConv2d" in out.stdout, out.stdout
