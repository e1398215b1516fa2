"""Packaging: the library installs and imports without the application's dependencies."""

from __future__ import annotations

import subprocess
import sys

import tomllib
from packaging.requirements import Requirement

from tests.conftest import ROOT

APP_ONLY = ["lightning", "pytorch_lightning", "hydra", "omegaconf", "wandb", "timm",
            "torchvision", "sklearn", "matplotlib", "pandas"]


NEWEST = {"torch": "2.15.0", "triton": "3.9.0", "lightning": "2.6.6"}  # newest releases checked
UPPER = ("<", "<=", "==", "===", "~=")  # operators that exclude later releases


def _name(requirement: str) -> str:
    return requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0]


def _requirements() -> list[tuple[str, str]]:
    """(where, requirement) for the dependencies and every extra, as pyproject.toml writes them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lists = {"dependencies": project["dependencies"],
             **{f"[{k}]": v for k, v in project["optional-dependencies"].items()}}
    return [(where, r) for where, reqs in lists.items() for r in reqs]


def test_the_newest_torch_triton_and_lightning_releases_are_admitted():
    """`pip install q8` (any extra) next to the newest torch, triton and Lightning keeps them."""
    requirements = [(where, Requirement(r)) for where, r in _requirements()]
    assert {"torch", "lightning"} <= {r.name for _, r in requirements}
    for where, r in requirements:
        if r.name in NEWEST:
            assert r.specifier.contains(NEWEST[r.name]), f"{where}: {r} excludes {NEWEST[r.name]}"


def test_every_upper_bound_says_why():
    """An upper bound (or a pin) only with its reason, a comment on its line."""
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    for where, r in _requirements():
        if any(spec.operator in UPPER for spec in Requirement(r).specifier):
            line = next(line for line in lines if f'"{r}"' in line)
            assert "#" in line.split(f'"{r}"', 1)[1], f"{where}: {r} without a reason"


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
import importlib.abc, importlib.machinery, sys
class Block(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    # importing one fails as if it were not installed; importlib.util.find_spec, which
    # torch._dynamo calls on import to list libraries without importing them, finds a spec
    # with no origin, which it skips
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {APP_ONLY!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError("blocked: " + spec.name, name=spec.name)
    def exec_module(self, module):
        pass
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


def _imports(path) -> set[str]:
    """The modules a file imports (at any depth: lazy imports in functions too)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _files_importing(folder, prefixes: tuple[str, ...], skip: tuple[str, ...] = ()) -> list:
    return sorted(str(f.relative_to(ROOT)) for f in (ROOT / folder).rglob("*.py")
                  if not any(part in skip for part in f.relative_to(ROOT).parts)
                  and any(n == p or n.startswith(p + ".") for n in _imports(f) for p in prefixes))


def test_the_layers_import_only_downwards():
    """The library (q8 less q8/lit) imports neither the application nor its callbacks; q8/lit
    does not import callbacks/; Hydra is imported by q8/lit/instantiate.py alone."""
    assert _files_importing("q8", ("q8.lit", "callbacks"), skip=("lit",)) == []
    assert _files_importing("q8/lit", ("callbacks",)) == []
    assert _files_importing("q8", ("hydra", "omegaconf")) == ["q8/lit/instantiate.py"]


def test_scripts_import_the_installed_q8():
    """scripts/ import q8 as installed (`make setup`: editable), never by editing sys.path."""
    edits = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "scripts").rglob("*"))
             if f.is_file() and "sys.path" in f.read_text(errors="replace")]
    assert edits == []
