"""The private APIs of torch and Lightning that q8 reads, each exercised on the installed
release as q8 calls it: a release that removes or changes one fails here, naming it.

torch: aten.convolution_backward (q8/gemm.py, QuantStatsCallback), torch._int_mm (gemm="int8"),
aten.native_batch_norm and its backward (q8/norm.py), TorchFunctionMode (q8/layers.py).
Lightning: the attributes q8.lit.lightning_internals reads, through that module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from q8.lit import lightning_internals

TORCH = f"torch {torch.__version__}"
LIGHTNING = f"lightning {L.__version__}"


@contextlib.contextmanager
def api(name: str, release: str) -> Iterator[None]:
    """Fail naming the API when the code inside raises or an assertion in it fails: the API is
    gone, takes other arguments or returns something else on this release."""
    try:
        yield
    except Exception as ex:  # AssertionError included: the API answers differently
        pytest.fail(f"{name} changed on {release}, and q8 relies on it: "
                    f"{type(ex).__name__}: {ex}", pytrace=False)


# ---------------------------------------------------------------- torch


def test_aten_convolution_backward(device):
    """q8's three calls: (dL/dW, dL/db) with the input, dL/dx alone with the input as a
    memoryless tensor of its shape, dL/dW alone with the weight as one; against autograd."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 7, 7, device=device, requires_grad=True)
    w = torch.randn(6, 2, 3, 3, device=device, requires_grad=True)  # groups=2
    b = torch.randn(6, device=device, requires_grad=True)
    geometry = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    y = F.conv2d(x, w, b, **geometry)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), g)
    args = (geometry["stride"], geometry["padding"], geometry["dilation"], False, [0, 0],
            geometry["groups"])

    def shaped(shape: torch.Size) -> torch.Tensor:  # q8.gemm._like
        return g.new_empty(()).expand(shape)

    with api("torch.ops.aten.convolution_backward", TORCH):
        _, got_w, got_b = torch.ops.aten.convolution_backward(
            g, x.detach(), shaped(w.shape), [6], *args, [False, True, True])
        got_x = torch.ops.aten.convolution_backward(
            g, shaped(x.shape), w.detach(), None, *args, [True, False, False])[0]
        got_w_alone = torch.ops.aten.convolution_backward(
            g, x.detach(), shaped(w.shape), None, *args, [False, True, False])[1]
        torch.testing.assert_close(got_w, gw)
        torch.testing.assert_close(got_b, gb)
        torch.testing.assert_close(got_x, gx)
        torch.testing.assert_close(got_w_alone, gw)


def test_int_mm(device):
    """torch._int_mm(a (m, k) int8, b^T (k, n) int8, b^T a transposed view) -> exact int32, at
    the smallest shapes q8.gemm._int_mm_fits lets through (m > 16, k >= 16, k and n of 8)."""
    torch.manual_seed(0)
    a = torch.randint(-128, 128, (17, 16), dtype=torch.int8, device=device)
    b = torch.randint(-128, 128, (8, 16), dtype=torch.int8, device=device)
    a[0], b[0] = -128, -128  # the largest product, 16 times: 2^18, exact in int32
    with api("torch._int_mm", TORCH):
        prod = torch._int_mm(a.contiguous(), b.contiguous().t())
        assert prod.dtype == torch.int32 and prod.shape == (17, 8), (prod.dtype, prod.shape)
        assert torch.equal(prod.long().cpu(), a.long().cpu() @ b.long().cpu().t())


def test_aten_native_batch_norm_and_backward(device):
    """Training-mode BN as q8/norm.py calls it: (y, save_mean, save_invstd) and the running
    statistics updated in place; the backward from save_mean and save_invstd with no running
    statistics; both against F.batch_norm and autograd."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5, device=device, requires_grad=True)
    weight = torch.randn(3, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    mean, var = torch.zeros(3, device=device), torch.ones(3, device=device)
    expected_mean, expected_var = mean.clone(), var.clone()
    y = F.batch_norm(x, expected_mean, expected_var, weight, bias, True, 0.1, 1e-5)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, weight, bias), g)

    with api("torch.ops.aten.native_batch_norm", TORCH):
        got, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            x.detach(), weight.detach(), bias.detach(), mean, var, True, 0.1, 1e-5)
        torch.testing.assert_close(got, y.detach())
        torch.testing.assert_close(save_mean, x.detach().mean((0, 2, 3)))
        biased = x.detach().var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(save_invstd, (biased + 1e-5).rsqrt())
        torch.testing.assert_close((mean, var), (expected_mean, expected_var))
    with api("torch.ops.aten.native_batch_norm_backward", TORCH):
        got_x, got_w, got_b = torch.ops.aten.native_batch_norm_backward(
            g, x.detach(), weight.detach(), None, None, save_mean, save_invstd, True, 1e-5,
            [True, True, True])
        torch.testing.assert_close((got_x, got_w, got_b), (gx, gw, gb))


def test_torch_function_mode():
    """q8/layers.py's _Reroute: a TorchFunctionMode whose __torch_function__ receives F.conv2d
    and F.linear themselves (compared with `is`) with the call's arguments, and calls torch
    inside it without re-entering the mode."""
    from torch.overrides import TorchFunctionMode

    seen = []

    class Reroute(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            kwargs = kwargs or {}
            if func is F.conv2d or func is F.linear:
                seen.append((func, len(args), sorted(kwargs)))
                return func(*args, **kwargs) * 0 + 7  # torch inside: must not be seen again
            return func(*args, **kwargs)

    conv, linear = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(4, 3)
    with api("torch.overrides.TorchFunctionMode", TORCH):
        with Reroute():
            y = conv(torch.randn(1, 1, 4, 4))
            z = linear(torch.randn(2, 4))
        assert [s[0] for s in seen] == [F.conv2d, F.linear], seen
        assert bool((y == 7).all()) and bool((z == 7).all())
        assert seen[0][1] == 7 and seen[1][1] == 3, seen  # (x, w, b, stride, ...), (x, w, b)
        assert linear(torch.ones(1, 4)).ne(7).any()  # the mode is gone after the with


# ---------------------------------------------------------------- Lightning


class Tiny(L.LightningModule):
    """Four steps of a linear layer on 8 samples; logs `loss` as an epoch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self.layer(x), y)
        self.log("loss", loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):  # noqa: ANN201
        data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
        return DataLoader(data, batch_size=2)


class AtStep(L.Callback):
    """Calls `action(trainer)` at the end of optimizer step `step`."""

    def __init__(self, step: int, action) -> None:  # noqa: ANN001
        self.step, self.action = step, action

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.action(trainer)


def _trainer(tmp_path: Path, *callbacks: L.Callback, **kwargs) -> L.Trainer:
    kwargs = {"max_epochs": 1, "logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path,
                     callbacks=list(callbacks), **kwargs)


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A one-task SLURM job; the file its `scontrol` writes to (fake_slurm_job)."""
    return fake_slurm_job(tmp_path, monkeypatch)


def fake_slurm_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This process as a one-task SLURM job (job 4242) whose `scontrol` appends its arguments
    to the file this returns."""
    bin_dir, log = tmp_path / "ctl", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/bash\necho "$@" >> "{log}"\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "q8", "SLURM_NTASKS": "1",
                        "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                        "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(name, value)
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    return log


def test_accelerator_connector_cluster_environment(tmp_path, slurm, monkeypatch):
    """Under SLURM: Lightning's SLURMEnvironment, with the auto_requeue and requeue_signal that
    ResumableCheckpoint reads; elsewhere another environment."""
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    name = "Trainer._accelerator_connector.cluster_environment"
    with api(name, LIGHTNING):
        env = lightning_internals.cluster_environment(_trainer(tmp_path))
        assert isinstance(env, SLURMEnvironment), env
        assert env.auto_requeue is True and env.requeue_signal == signal.SIGUSR1, (
            env.auto_requeue, env.requeue_signal)
    monkeypatch.delenv("SLURM_NTASKS")
    with api(name, LIGHTNING):
        env = lightning_internals.cluster_environment(_trainer(tmp_path))
        assert isinstance(env, ClusterEnvironment) and not isinstance(env, SLURMEnvironment)


def test_signal_connector_received_sigterm(tmp_path):
    """True stops fit with SIGTERMException after that batch; False written after True in the
    same batch withdraws the stop (ResumableCheckpoint defers a stop during validation so)."""
    name = "Trainer._signal_connector.received_sigterm"
    stop = AtStep(2, lambda t: lightning_internals.set_received_sigterm(t, True))
    trainer = _trainer(tmp_path, stop)
    with api(name, LIGHTNING):
        try:
            trainer.fit(Tiny())
            stopped = False
        except SIGTERMException:
            stopped = True
        assert stopped and trainer.global_step == 2, (stopped, trainer.global_step)

    def stop_then_withdraw(t: L.Trainer) -> None:
        lightning_internals.set_received_sigterm(t, True)
        assert t.received_sigterm  # what Lightning's loops read
        lightning_internals.set_received_sigterm(t, False)

    trainer = _trainer(tmp_path, AtStep(2, stop_then_withdraw))
    with api(name, LIGHTNING):
        trainer.fit(Tiny())
        assert trainer.global_step == 4 and not trainer.received_sigterm


def test_signal_connector_slurm_requeue(tmp_path, slurm):
    """Lightning's SLURM requeue handler, called at a batch end: hpc_ckpt_1.ckpt of that step in
    default_root_dir, `scontrol requeue <job id>`, and training goes on."""
    trainer = _trainer(tmp_path, AtStep(2, lambda t: lightning_internals.slurm_requeue(
        t, signal.SIGUSR1)))
    with api("Trainer._signal_connector._slurm_sigusr_handler_fn", LIGHTNING):
        trainer.fit(Tiny())
        assert trainer.global_step == 4
        hpc = tmp_path / "hpc_ckpt_1.ckpt"
        assert hpc.is_file(), sorted(p.name for p in tmp_path.iterdir())
        assert torch.load(hpc, map_location="cpu", weights_only=True)["global_step"] == 2
        assert slurm.read_text() == "requeue 4242\n"


def test_fit_loop_epoch_loop_results(tmp_path):
    """The training step's logged values, with the fields ExactResume adds to: an epoch mean's
    running sum and batch count."""
    from callbacks.exact_resume import _epoch_means

    seen = {}

    def read(trainer: L.Trainer) -> None:
        results = lightning_internals.epoch_results(trainer)
        m = results["training_step.loss"]
        seen.update(keys=set(results), means=set(_epoch_means(trainer)),
                    fields=(m.is_tensor, m.meta.on_epoch, m.meta.is_mean_reduction),
                    value=m.value.clone(), size=m.cumulated_batch_size.clone())

    with api("Trainer.fit_loop.epoch_loop._results", LIGHTNING):
        _trainer(tmp_path, AtStep(2, read)).fit(Tiny())
        assert "training_step.loss" in seen["keys"], seen
        assert seen["means"] == {"training_step.loss"}, seen
        assert seen["fields"] == (True, True, True), seen
        # two batches of 2 so far: the sum of loss x batch size over 4 samples
        assert seen["size"].item() == 4 and seen["value"].item() > 0, seen


def test_model_checkpoint_protected_members(tmp_path):
    """What ResumableCheckpoint calls on its base class: save last.ckpt of this step, the step
    it saved, the check that skips a step already saved, where the epoch's checkpoints go."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    seen = {}
    callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)

    def save(trainer: L.Trainer) -> None:
        seen["skip_before"] = lightning_internals.should_skip_saving(callback, trainer)
        lightning_internals.save_last(callback, trainer)
        seen["saved"] = lightning_internals.last_global_step_saved(callback)
        seen["skip_after"] = lightning_internals.should_skip_saving(callback, trainer)
        seen["on_train_epoch_end"] = lightning_internals.saves_on_train_epoch_end(
            callback, trainer)

    trainer = _trainer(tmp_path, AtStep(2, save), callback, enable_checkpointing=True)
    with api("ModelCheckpoint._save_last_checkpoint and its helpers", LIGHTNING):
        trainer.fit(Tiny())
        assert seen == {"skip_before": False, "saved": 2, "skip_after": True,
                        "on_train_epoch_end": True}, seen  # no validation: at the epoch's end
        last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu",
                          weights_only=True)
        assert last["global_step"] == 2


def test_wandb_logger_experiment(tmp_path):
    """q8/lit/loggers.py finishes a W&B run only if one started: `WandbLogger._experiment`
    is None until `.experiment` starts it."""
    from lightning.pytorch.loggers import WandbLogger

    pytest.importorskip("wandb")
    with api("WandbLogger._experiment", LIGHTNING):
        logger = WandbLogger(save_dir=tmp_path, offline=True)
        assert lightning_internals.wandb_run_started(logger) is False
