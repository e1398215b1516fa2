"""q8.lightning.Q8Precision: q8 in a Lightning project that is not q8's app, with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import q8
from q8.lightning import Q8FabricPrecision, Q8Precision
from tests import lightning_user_project as project
from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "lightning_user_project.py"


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, project.Classifier]:
    out = tmp_path_factory.mktemp("user_project")
    return out, project.fit(out, devices=1, steps=30)


def test_the_plugin_quantizes_the_users_model_and_it_learns(trained) -> None:
    """Every conv and linear of torchvision's ResNet-18 became a q8 twin, every BatchNorm Range
    BN; the loss of this fixed seed and CPU backend falls from chance (ln 10 = 2.30)."""
    out, model = trained
    convs = [m for m in model.modules() if type(m) is torch.nn.Conv2d]
    assert not convs and isinstance(model.net.conv1, q8.QuantConv2d)
    assert isinstance(model.net.fc, q8.QuantLinear)
    assert isinstance(model.net.bn1, q8.RangeBatchNorm2d)
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > 1.5 and last < first / 2, (first, last)


def test_the_checkpoint_holds_a_float_state_dict_and_the_q8_state(trained) -> None:
    out, model = trained
    ckpt = torch.load(out / "model.ckpt", map_location="cpu", weights_only=False)
    entry = ckpt["Q8Precision"]
    assert entry["config"]["backend"] == "cpu" and entry["config"]["grad_bits"] == 8
    assert set(ckpt["state_dict"]) == set(project.Classifier().state_dict())  # the float keys
    q8_keys = {k for k in model.state_dict() if k not in ckpt["state_dict"]}
    assert q8_keys == set(entry["buffers"]) and "net.conv1.act_range" in q8_keys
    assert torch.equal(entry["buffers"]["net.conv1.act_range"], model.net.conv1.act_range)


def test_the_checkpoint_loads_and_resumes_in_a_fresh_process(trained) -> None:
    out, _ = trained
    proc = _run("check", "--out", str(out))
    assert proc.returncode == 0 and "checked" in proc.stdout, proc.stderr[-3000:]


def test_fabric_converts_the_module_it_sets_up() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[Q8FabricPrecision(q8.QuantConfig())])
    torch.manual_seed(0)
    model = project.Classifier().net
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    assert isinstance(model.module.conv1, q8.QuantConv2d)
    x, y = project.digits(32).tensors
    loss = torch.nn.functional.cross_entropy(model(x), y)
    fabric.backward(loss)
    optimizer.step()
    assert torch.isfinite(loss) and model.module.conv1.weight.grad is not None


def test_a_checkpoint_of_another_plugin_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    with pytest.raises(ValueError, match="not saved with Q8Precision"):
        Q8Precision.from_checkpoint(str(tmp_path / "plain.ckpt"))


def test_ddp_with_two_processes(tmp_path: Path) -> None:
    """strategy=ddp on 2 CPU processes (Lightning runs the script again for rank 1): both ranks
    convert their model, train, and the checkpoint they save reloads in a fresh process."""
    proc = _run("fit", "--out", str(tmp_path), "--devices", "2", "--steps", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads((tmp_path / "losses.json").read_text())) == 6
    ckpt = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["Q8Precision"]["buffers"]
