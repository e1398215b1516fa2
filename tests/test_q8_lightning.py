"""q8.lightning.Q8Precision: q8 in a Lightning project that is not q8's app, with one line."""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q8
from q8.lightning import Q8FabricPrecision, Q8Precision, _FloatHyperParameters
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
    """Every conv and linear of torchvision's ResNet-18 became a q8 twin, every BatchNorm the
    default's BN twin; the loss of this fixed seed and CPU backend falls from chance
    (ln 10 = 2.30)."""
    out, model = trained
    convs = [m for m in model.modules() if type(m) is torch.nn.Conv2d]
    assert not convs and isinstance(model.net.conv1, q8.QuantConv2d)
    assert isinstance(model.net.fc, q8.QuantLinear)
    assert isinstance(model.net.bn1, q8.QuantBatchNorm2d)
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


@pytest.fixture(scope="module")
def fresh_process(trained) -> subprocess.CompletedProcess:
    """One fresh process that first loads the checkpoint while `import q8` fails, then (q8
    still never imported) loads it in 8 bits and resumes: one start-up for both checks."""
    out, _ = trained
    return _run("load", "check", "--out", str(out))


def test_the_checkpoint_loads_where_q8_cannot_be_imported(fresh_process) -> None:
    """load_from_checkpoint, with the `net` hyper-parameter, in a process where `import q8`
    fails: the float ResNet-18 of the trained weights (lightning_user_project.load)."""
    assert "loaded without q8" in fresh_process.stdout, fresh_process.stderr[-3000:]


def test_the_checkpoint_loads_and_resumes_in_a_fresh_process(fresh_process) -> None:
    assert fresh_process.returncode == 0 and "checked" in fresh_process.stdout, (
        fresh_process.stderr[-3000:])


class _RefuseQ8(pickle.Unpickler):
    """Unpickles as a process without q8 would: any class or function of q8 fails."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        assert module.split(".")[0] != "q8", f"pickled q8 object: {module}.{name}"
        return super().find_class(module, name)


def _unpickle_without_q8(obj):
    return _RefuseQ8(io.BytesIO(pickle.dumps(obj))).load()


def test_the_checkpoint_hyper_parameters_hold_the_float_net(trained) -> None:
    """The `net` hyper-parameter is saved as the float ResNet-18 of the trained weights (a
    copy sharing them at save time); the trained model itself stays quantized."""
    out, model = trained
    ckpt = torch.load(out / "model.ckpt", map_location="cpu", weights_only=False)
    net = ckpt["hyper_parameters"]["net"]
    assert {type(m).__module__.split(".")[0] for m in net.modules()} == {"torchvision", "torch"}
    assert set(net.state_dict()) == {k.removeprefix("net.") for k in ckpt["state_dict"]}
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["state_dict"]["net." + k]), k
    assert not any(k.startswith("q8_") for m in net.modules() for k in vars(m))
    assert isinstance(model.net.conv1, q8.QuantConv2d) and model.hparams.net is model.net
    _unpickle_without_q8(net)


Pair = namedtuple("Pair", "a b")


def test_hyper_parameters_in_containers_are_saved_float() -> None:
    """Modules inside dicts, lists and tuples of the hyper-parameters are saved float too; the
    LightningModule's own containers are left as they were."""
    quantized = q8.quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), q8.QuantConfig())
    plain = nn.Linear(2, 2)
    pair = Pair(quantized, 3)
    hparams = {"nets": {"body": quantized, "head": plain}, "all": [quantized, (pair, "x")]}
    inner = hparams["nets"]
    checkpoint = {"hyper_parameters": dict(hparams)}
    _FloatHyperParameters().on_save_checkpoint(None, None, checkpoint)
    saved = checkpoint["hyper_parameters"]
    float_net = saved["nets"]["body"]
    assert type(float_net[0]) is nn.Conv2d and type(float_net[1]) is nn.ReLU
    assert saved["all"][0] is float_net and saved["all"][1][0].a is float_net  # one copy
    assert type(saved["all"][1][0]) is Pair and saved["all"][1][0].b == 3
    assert saved["nets"]["head"] is plain  # nothing of q8 in it: not copied
    assert float_net[0].weight is quantized[0].weight  # shares the tensors
    assert hparams["nets"] is inner and inner["body"] is quantized  # the module's own, as before
    assert isinstance(quantized[0], q8.QuantConv2d) and hasattr(quantized[0], "act_range")
    _unpickle_without_q8(saved)


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


@pytest.mark.slow  # 2 processes; tests/test_distributed.py runs the app's Q8Precision under DDP
def test_ddp_with_two_processes(tmp_path: Path) -> None:
    """strategy=ddp on 2 CPU processes (Lightning runs the script again for rank 1) with
    sync_batchnorm=True: both ranks convert their model, Lightning's SyncBatchNorm becomes
    synchronised Range BN (the ranks' running statistics agree; without the sync they differ)
    and stays so after fit, when Lightning turns every SyncBatchNorm back into a float BN."""
    proc = _run("fit", "--out", str(tmp_path), "--devices", "2", "--steps", "6", "--sync-bn")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(json.loads((tmp_path / "losses.json").read_text())) == 6
    ckpt = torch.load(tmp_path / "model.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6 and ckpt["Q8Precision"]["buffers"]
    for rank in (0, 1):
        norms = json.loads((tmp_path / f"norms_rank{rank}.json").read_text())
        assert len(norms) == 20 and all(n == ["RangeBatchNorm2d", "world"]
                                        for n in norms.values()), norms
    means = [torch.load(tmp_path / f"bn1_mean_rank{rank}.pt") for rank in (0, 1)]
    assert torch.equal(*means) and means[0].abs().sum() > 0
    assert type(ckpt["hyper_parameters"]["net"].bn1) is nn.SyncBatchNorm  # as it was trained


class Tiny(L.LightningModule):
    """Conv, BN and `mid` quantized; `pre` and `head` left to bf16 autocast by config.skip."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.pre, self.mid, self.head = nn.Linear(288, 32), nn.Linear(32, 32), nn.Linear(32, 10)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.head(self.mid(self.pre(self.body(x))))

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _record(model: nn.Module, names: list[str]) -> tuple[list, list]:
    """(name, input, output, weight, bias) of every call of the named linear layers, and the
    hooks' handles."""
    calls = []

    def hook(name):  # noqa: ANN001, ANN202
        return lambda m, args, out: calls.append(
            (name, args[0].detach().clone(), out.detach().clone(), m.weight.detach().clone(),
             m.bias.detach().clone()))

    return calls, [getattr(model, name).register_forward_hook(hook(name)) for name in names]


def _tiny_data() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3, 8, 8, generator=g),
                                          torch.randint(0, 10, (64,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=16)


def _check_float32_island(calls: list, layer: nn.Module) -> None:
    """`mid` took bf16 from `pre` and gave float32: it ran as q8 in float32 outside autocast,
    the same output to the bit; `pre` and `head` (not q8's) ran in bf16."""
    by_name = {}
    for name, x, y, w, b in calls:
        by_name.setdefault(name, (x, y, w, b))
    assert by_name["pre"][1].dtype == by_name["head"][1].dtype == torch.bfloat16
    x, y, w, b = by_name["mid"]
    assert x.dtype == torch.bfloat16 and y.dtype == torch.float32
    again = copy.deepcopy(layer).train()
    with torch.no_grad():
        again.weight.copy_(w)
        again.bias.copy_(b)
        assert torch.equal(again(x.float()), y)  # bf16 GEMMs would differ (by ~1e-2 here)


def test_bf16_mixed_beside_q8_trains_with_the_q8_layers_in_float32() -> None:
    L.seed_everything(0)
    model = Tiny()
    calls, hooks = _record(model, ["pre", "mid", "head"])
    config = q8.QuantConfig(backend="cpu", skip=("pre", "head"))
    t = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  plugins=[Q8Precision(config, precision="bf16-mixed")])
    t.fit(model, _tiny_data())
    assert t.precision == "bf16-mixed"
    assert type(model.mid) is q8.QuantLinear and type(model.pre) is nn.Linear
    for layer in (model.body[0], model.mid):  # every step quantized their input
        assert int(layer.act_range_steps) == 3
    assert type(model.body[1]) is q8.QuantBatchNorm2d  # BN in full precision, codes saved
    _check_float32_island(calls, model.mid)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for h in hooks:
        h.remove()
    float_model = _unpickle_without_q8(q8.dequantize_model(model, inplace=False))
    assert "forward" not in vars(float_model.mid) and type(float_model.mid) is nn.Linear


def test_fabric_with_bf16_mixed() -> None:
    fabric = L.Fabric(accelerator="cpu", devices=1, plugins=[Q8FabricPrecision(
        q8.QuantConfig(backend="cpu", skip=("pre", "head")), precision="bf16-mixed")])
    torch.manual_seed(0)
    module = Tiny()
    calls, _ = _record(module, ["pre", "mid", "head"])
    model, optimizer = fabric.setup(module, torch.optim.SGD(module.parameters(), lr=0.05))
    x, y = next(iter(_tiny_data()))
    logits = model(x)
    assert logits.dtype == torch.float32  # convert_output, as Lightning's MixedPrecision
    fabric.backward(F.cross_entropy(logits, y))
    optimizer.step()
    assert int(module.mid.act_range_steps) == 1 and module.mid.weight.grad is not None
    _check_float32_island(calls, module.mid)


def test_a_precision_beside_the_plugin_is_refused_and_the_plugin_takes_it() -> None:
    """As the module docstring says: Lightning refuses both; the plugin takes 32-true and
    bf16-mixed only."""
    with pytest.raises(ValueError, match="Choose one"):
        L.Trainer(accelerator="cpu", precision="bf16-mixed", plugins=[Q8Precision()])
    with pytest.raises(ValueError, match="valid choices are 32-true, bf16-mixed"):
        Q8Precision(precision="16-mixed")
    assert Q8Precision().precision == "32-true"
