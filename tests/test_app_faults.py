"""The application under faults: signals and SIGKILL resume to the uninterrupted run's exact
results; bad input is refused before training; non-finite values are traced to their layer;
a long quantized run stays finite."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from q8.lit import lightning_internals
from tests.conftest import ROOT, TINY, TINY_DIGITS
from tests.test_private_apis import AtStep, Tiny, fake_slurm_job

# Three epochs of 12 steps, last.ckpt also every 5 steps: a signal lands mid-epoch.
RUN = [
    *[o for o in TINY if not o.startswith(("trainer.max_epochs", "trainer.limit_train"))],
    *TINY_DIGITS,
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=12",
    "callbacks.q8_stats.log_every_n_steps=0",
    "callbacks.model_checkpoint.last_every_n_train_steps=5",
    "threads=1",
    "seed=3",
]
# Compared exactly: on a CPU, with one thread, a resumed run performs the same float operations
# on the same restored values (weights, optimizer and scheduler state, BN and activation-range
# buffers, RNG, data order) as the uninterrupted run; any state left behind shows as a
# difference of order 1e-2 or more within a few steps, never as a last-bit one.
# timm's 0.4M-parameter ResNet (BasicBlock and Bottleneck stages, BN, residuals): a q8 step
# costs a tenth of ResNet-18's on a CPU; one thread, as a shared CPU runs it best.
SMALL_MODEL = ["model=timm", "model.name=test_resnet", "threads=1"]
FINAL_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/loss",
              "test/acc", "global_step")


@pytest.fixture
def _threads_restored():
    """train() sets torch's thread count (`threads=`) for the whole process: undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}", *extra],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=600,
    )


def _step_losses(run_dir: Path, last_launch: bool = False) -> dict[int, float]:
    """train/loss_step by step, from the CSV logs: the run's whole history (every launch's, a
    resumed launch's replacing the steps it trained again), or the last launch's alone."""
    from q8.lit.run_history import metrics_files, read_history, values

    source = metrics_files(run_dir)[-1] if last_launch else run_dir
    return {int(k): float(v) for k, v in values(read_history(source), "train/loss_step").items()}


def _last_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)["global_step"]


def _start_and_stop(run_dir: Path, signum: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, send `signum` once a last.ckpt exists (the periodic one of step 5, inside
    the first epoch), wait for the exit; also return the step of that first last.ckpt."""
    proc = subprocess.Popen(
        [sys.executable, "train.py", *RUN, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env(),
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 400
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signum)
    first_step = _last_step(run_dir)
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), first_step


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[int, float]]:
    """The reference: RUN without interruption (its metrics.json and per-step losses)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    full = _train(run_dir)
    assert full.returncode == 0, full.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text()), _step_losses(run_dir)


def _assert_resumed_like(run_dir: Path, start: int, uninterrupted: tuple) -> None:
    expected, expected_losses = uninterrupted
    resumed = _train(run_dir, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = json.loads((run_dir / "metrics.json").read_text())
    assert got["start_step"] == start
    resumed_losses = _step_losses(run_dir, last_launch=True)
    assert min(resumed_losses) == start and max(resumed_losses) == expected["global_step"] - 1
    assert _step_losses(run_dir) == expected_losses  # the history before the stop is kept
    assert {k: got[k] for k in FINAL_KEYS} == {k: expected[k] for k in FINAL_KEYS}
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow  # two training subprocesses (and the shared uninterrupted run): about 60 s
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_last_ckpt_and_resume_matches_uninterrupted(
    signum: int, tmp_path: Path, uninterrupted: tuple
) -> None:
    run_dir = tmp_path / "stopped"
    stopped, first_step = _start_and_stop(run_dir, signum)
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    assert "stopped by a signal" in stopped.stdout
    assert not (run_dir / "metrics.json").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    # the step the run stopped at is the step of last.ckpt: nothing trained is lost (if the
    # signal came within the step of a periodic save, that save is already current)
    stopped_at = re.search(r"Stopped by a signal at step (\d+): saved .*last\.ckpt",
                           stopped.stdout)
    assert stopped_at, stopped.stdout[-3000:]
    assert ckpt["global_step"] == int(stopped_at[1])
    assert first_step <= ckpt["global_step"] < uninterrupted[0]["global_step"]
    assert {"torch", "numpy", "python"} <= set(ckpt["rng_states"])
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # atomic writes: no temp file
    _assert_resumed_like(run_dir, ckpt["global_step"], uninterrupted)


@pytest.mark.slow  # two training subprocesses (and the shared uninterrupted run): about 60 s
def test_sigkill_resumes_from_the_last_periodic_checkpoint(
    tmp_path: Path, uninterrupted: tuple
) -> None:
    """SIGKILL cannot be caught: the run resumes from the last periodic last.ckpt (every 5
    steps here), which a kill never leaves half-written; a temporary file that a kill during a
    write would leave is removed by the next run."""
    run_dir = tmp_path / "killed"
    killed, _ = _start_and_stop(run_dir, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    step = _last_step(run_dir)  # loads: the file is complete
    assert 0 < step < uninterrupted[0]["global_step"]
    (run_dir / "checkpoints" / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")
    _assert_resumed_like(run_dir, step, uninterrupted)


# ------------------------------------------------------------- mid-epoch resume, in-process


class StopAfterStep(L.Callback):
    """After optimizer step `step`: stop as Lightning's SIGTERM handler would (`crash=False`),
    or raise, as a crash that saves nothing (like SIGKILL) would end the run."""

    def __init__(self, step: int, crash: bool = False) -> None:
        self.step = step
        self.crash = crash

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.crash:
            raise RuntimeError("crash")
        lightning_internals.set_received_sigterm(trainer, True)


def test_mid_epoch_resume_reproduces_the_uninterrupted_run(
    tiny_config, tmp_path: Path, _threads_restored
) -> None:
    """Two epochs of 4 steps with stochastic rounding and augmentation, last.ckpt also every 3
    steps. Stopped after step 5 (a signal: last.ckpt of step 5) or crashed after step 7 (the
    periodic last.ckpt of step 6), then resumed: the same batches, noise and final metrics."""
    from train import train

    run = [*SMALL_MODEL, "trainer.max_epochs=2", "trainer.limit_train_batches=4", "seed=5",
           "callbacks.q8_stats.log_every_n_steps=0",
           "callbacks.model_checkpoint.last_every_n_train_steps=3"]
    expected = train(tiny_config(*run, run_dir=tmp_path / "full"))
    full_losses = _step_losses(tmp_path / "full")
    for name, step, crash, start in [("stopped", 5, False, 5), ("crashed", 7, True, 6)]:
        stop = ["+callbacks.stop._target_=tests.test_app_faults.StopAfterStep",
                f"+callbacks.stop.step={step}", f"+callbacks.stop.crash={crash}"]
        with pytest.raises(RuntimeError if crash else SystemExit) as ended:
            train(tiny_config(*run, *stop, run_dir=tmp_path / name))
        assert crash or ended.value.code == 143
        assert _last_step(tmp_path / name) == start
        got = train(tiny_config(*run, "ckpt_path=last", run_dir=tmp_path / name))
        assert got["start_step"] == start
        assert {k: got[k] for k in FINAL_KEYS} == {k: expected[k] for k in FINAL_KEYS}, name
        assert min(_step_losses(tmp_path / name, last_launch=True)) == start
        assert _step_losses(tmp_path / name) == full_losses, name


# ------------------------------------------------------------- signals during fit, in-process


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return fake_slurm_job(tmp_path, monkeypatch)


@pytest.fixture
def pre_fit_handlers() -> list[int]:
    """train.py's handlers before fit (a signal outside fit stops with StoppedBySignal): here
    they record the signals they get, and are what fit must restore."""
    got: list[int] = []

    def outside_fit(signum: int, frame: object) -> None:
        got.append(signum)

    previous = {s: signal.signal(s, outside_fit) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield got
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _fit_signalled(tmp_path: Path, signum: int) -> tuple[L.Trainer, bool]:
    """Four steps of Tiny with ResumableCheckpoint, `signum` sent to this process at the end of
    step 2; (the trainer, whether fit stopped with SIGTERMException)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from callbacks.checkpoint import ResumableCheckpoint

    checkpoint = ResumableCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True,
                                     save_top_k=0)
    send = AtStep(2, lambda trainer: os.kill(os.getpid(), signum))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, callbacks=[send, checkpoint])
    try:
        trainer.fit(Tiny())
    except SIGTERMException:
        return trainer, True
    return trainer, False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_during_fit_saves_last_ckpt_and_stops_at_that_step(tmp_path, signum,
                                                                    pre_fit_handlers):
    trainer, stopped = _fit_signalled(tmp_path, signum)
    assert stopped and trainer.global_step == 2
    assert _last_step(tmp_path) == 2
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert pre_fit_handlers == []  # fit's handler took it
    assert all(signal.getsignal(s).__name__ == "outside_fit"
               for s in (signal.SIGTERM, signal.SIGUSR1))  # and gave the signals back


def test_sigusr1_under_slurm_saves_hpc_ckpt_requeues_and_trains_on(tmp_path, slurm,
                                                                  pre_fit_handlers):
    """Lightning's requeue, run by every rank at the batch end after the signal although
    train.py's handler kept Lightning from installing its own: hpc_ckpt_1.ckpt of that step,
    `scontrol requeue`; training goes on until SLURM's SIGTERM (here: none, the epoch ends)."""
    trainer, stopped = _fit_signalled(tmp_path, signal.SIGUSR1)
    assert not stopped and trainer.global_step == 4
    hpc = torch.load(tmp_path / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert hpc["global_step"] == 2
    assert slurm.read_text() == "requeue 4242\n"
    assert pre_fit_handlers == []
    assert signal.getsignal(signal.SIGUSR1).__name__ == "outside_fit"


def test_sigterm_under_slurm_still_saves_last_ckpt_and_stops(tmp_path, slurm, pre_fit_handlers):
    trainer, stopped = _fit_signalled(tmp_path, signal.SIGTERM)
    assert stopped and trainer.global_step == 2 and _last_step(tmp_path) == 2
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt")) and not slurm.exists()


@pytest.mark.parametrize("under_slurm", [False, True], ids=["local", "slurm"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_outside_fit_exits_143_with_one_line(signum, under_slurm, tmp_path,
                                                      monkeypatch, capsys):
    """train.py's handlers, before fit or after it (under SLURM too: nothing to requeue from)."""
    import train

    if under_slurm:
        fake_slurm_job(tmp_path, monkeypatch)
    for name in ("Q8_RUN_ID", "HYDRA_FULL_ERROR"):  # cli() sets them: restored afterwards
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    monkeypatch.setattr(train, "main", lambda: os.kill(os.getpid(), signum))
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(SystemExit) as ended:
            train.cli()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert ended.value.code == 143
    name = signal.Signals(signum).name
    assert capsys.readouterr().err.splitlines() == [
        f"stopped by {name} outside training: this stop saved no checkpoint"]


def test_resumable_sampler_keeps_torchs_order_and_random_stream() -> None:
    """Uninterrupted runs shuffle as with DataLoader(shuffle=True): the same orders, from the
    same one draw of the global RNG per epoch, so later random numbers are unchanged."""
    from torch.utils.data import RandomSampler

    from q8.lit.train_order import ResumableSampler

    torch.manual_seed(0)
    orders = [list(RandomSampler(range(50))) for _ in range(3)]
    after = torch.rand(2)
    torch.manual_seed(0)
    sampler = ResumableSampler(range(50))
    assert [list(sampler) for _ in range(3)] == orders
    assert torch.equal(torch.rand(2), after)


def test_resumed_loader_replays_the_rest_of_the_epoch_without_drawing() -> None:
    from torch.utils.data import TensorDataset

    from q8.lit.train_order import ResumableDataLoader, ResumableSampler

    data = TensorDataset(torch.arange(10))
    loader = ResumableDataLoader(data, batch_size=2, sampler=ResumableSampler(data))
    order = torch.cat([b[0] for b in loader]).tolist()
    seed = loader.sampler.epoch_seed
    state = torch.get_rng_state()
    loader.sampler.resume(seed, 4)
    loader.keep_rng = True
    assert torch.cat([b[0] for b in loader]).tolist() == order[4:]
    assert torch.equal(torch.get_rng_state(), state)  # neither the sampler nor the loader drew
    list(loader)  # the next epoch: a new permutation, drawn as usual
    assert not torch.equal(torch.get_rng_state(), state)


def test_atomic_checkpoint_io_replaces_the_file(tmp_path: Path) -> None:
    from q8.lit.checkpoint_io import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "ck" / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, path)
    io.save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.load(path, weights_only=True)["a"].sum() == 0
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("with_validation", [True, False])
def test_last_ckpt_follows_every_epoch_without_a_new_best(tmp_path: Path,
                                                          with_validation: bool) -> None:
    """Lightning >= 2.5 rewrites last.ckpt only with a new best checkpoint; a monitored value
    that never improves would leave it at epoch 0. ResumableCheckpoint keeps it current."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.checkpoint import ResumableCheckpoint

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN202
            loss = self.lin(batch[0]).pow(2).mean()
            self.log("score", 1.0, on_epoch=True, on_step=False)  # never improves
            return loss

        def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN202
            self.log("score", 1.0)

        def configure_optimizers(self):  # noqa: ANN202
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4)
    ckpt = ResumableCheckpoint(dirpath=tmp_path, monitor="score", mode="max", save_last=True,
                               filename="best")
    trainer = L.Trainer(max_epochs=3, callbacks=[ckpt], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1.0 if with_validation else 0)
    trainer.fit(Net(), loader, loader if with_validation else None)
    best = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert best["global_step"] == 2  # the first epoch: later epochs tie, never improve
    assert last["global_step"] == trainer.global_step == 6


# ---------------------------------------------------------------- non-finite values


def _tiny_run(action, poison, tmp_path):
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from callbacks.nan_guard import NanGuard
    from q8 import QuantConfig, quantize_model

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = quantize_model(nn.Sequential(
                nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                nn.Linear(4 * 6 * 6, 3)), QuantConfig())

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            if self.global_step == 1:
                poison(self.net)
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,)))
    guard = NanGuard(action)
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, callbacks=[guard],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    model = Net()
    trainer.fit(model, DataLoader(data, batch_size=16))
    return model, guard


def _inf_weight(net):
    import torch

    with torch.no_grad():
        net[4].weight[0, 0] = float("inf")


def test_non_finite_weight_stops_naming_the_layer(tmp_path):
    from q8.lit.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"net\.4\.weight: weights"):
        _tiny_run("stop", _inf_weight, tmp_path)


def test_non_finite_activation_is_traced_to_its_layer(tmp_path):
    from q8.lit.errors import NonFiniteError

    def nan_into_relu(net):  # NaN activations enter net.2 from now on
        net[2].register_forward_pre_hook(lambda m, args: (args[0] * float("nan"),))

    with pytest.raises(NonFiniteError, match=r"net\.2: activations"):
        _tiny_run("stop", nan_into_relu, tmp_path)


def test_non_finite_bn_parameter_is_named(tmp_path):
    import torch

    from q8.lit.errors import NonFiniteError

    def nan_bn_bias(net):  # a NaN bias in BN: the next layers see NaN activations
        with torch.no_grad():
            net[1].bias[0] = float("nan")

    with pytest.raises(NonFiniteError, match=r"net\.1\.bias: weights"):
        _tiny_run("stop", nan_bn_bias, tmp_path)


class _InfGradient(torch.autograd.Function):
    """Identity forward; a backward that returns inf: a fault in the backward pass only."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


class _FlattenWithInfBackward(torch.nn.Flatten):
    def forward(self, x):
        return _InfGradient.apply(super().forward(x))


def _inf_backward_in_flatten(net):  # net.3's backward turns a finite g_l into inf
    net[3] = _FlattenWithInfBackward()


def _inf_backward_after_the_last_layer(net):  # dL/dy of net.4 (the logits) is inf
    net.register_forward_hook(lambda m, args, out: _InfGradient.apply(out))


@pytest.mark.parametrize(
    ("poison", "message"),
    [
        (_inf_backward_in_flatten, r"first at net\.3: g_l it passes back \(dL/dx\)"),
        (_inf_backward_after_the_last_layer, r"first at net\.4: g_l \(dL/dy at its output\)"),
    ],
    ids=["in-a-layer", "after-the-last-layer"],
)
def test_non_finite_g_l_in_the_backward_is_traced_to_its_layer(poison, message, tmp_path):
    from q8.lit.errors import NonFiniteError

    with pytest.raises(NonFiniteError, match=r"at step 1, " + message):
        _tiny_run("stop", poison, tmp_path)


def test_replay_reruns_a_step_with_its_rng_and_restores_buffers():
    from torch import nn

    from callbacks.nan_guard import replaying

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).train()
    start = {"cpu": torch.get_rng_state()}
    noise = torch.rand(3)  # what the step drew
    running, after = model[1].running_mean.clone(), torch.get_rng_state()
    with replaying(model, start):
        assert torch.equal(torch.rand(3), noise)  # the same draws as the failing step
        model(torch.randn(4, 1, 5, 5))  # a training-mode forward updates BN's statistics
        assert not torch.equal(model[1].running_mean, running)
    assert torch.equal(model[1].running_mean, running)
    assert torch.equal(torch.get_rng_state(), after)  # training's random stream is untouched


def test_skip_action_drops_bad_steps_and_keeps_weights_finite(tmp_path):
    import torch

    calls = []

    def nan_grad_once(net):
        calls.append(1)
        if len(calls) == 1:  # a NaN input batch on one step only: gradients go NaN
            net[0].register_forward_pre_hook(
                lambda m, args: (args[0] * float("nan"),) if len(calls) == 1 else None)

    model, guard = _tiny_run("skip", nan_grad_once, tmp_path)
    assert guard.skipped >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_guard_rejects_unknown_action():
    from callbacks.nan_guard import NanGuard

    with pytest.raises(ValueError, match="stop, skip"):
        NanGuard("ignore")


# ---------------------------------------------------------------- long run


class MemoryProbe(L.Callback):
    """Test-only: at the given steps, this process's resident memory (bytes) and the number of
    objects the garbage collector tracks, written to `path` as JSON at the end of training."""

    def __init__(self, path: str, steps: list[int]) -> None:
        self.path, self.steps, self.seen = Path(path), set(steps), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import gc

        if trainer.global_step in self.steps and trainer.global_step not in self.seen:
            gc.collect()
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            self.seen[trainer.global_step] = {"rss": pages * os.sysconf("SC_PAGE_SIZE"),
                                              "objects": len(gc.get_objects())}

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.seen))


@pytest.mark.slow  # about 70 s on 2 CPU cores (several minutes when other jobs share them)
def test_2000_q8_bifurcated_steps_on_digits_stay_finite_and_learn(tmp_path: Path) -> None:
    """2,000 steps of the paper's setting (8-bit W/A/g_l, 16-bit g_W copy, stochastic rounding,
    Range BN) on a small ResNet: every step's loss and gradients finite, the loss going down,
    memory flat after warm-up: resident memory at step 2,000 within 5% of step 200's, and the
    Python objects no more numerous at step 2,000 than at step 1,000 but for a few hundred
    (a leak of one object per step would add 1,000).

    NanGuard (on by default, action=stop) checks the gradients at every step and ends the run
    with exit code 1 at the first non-finite one, so exit code 0 means none occurred. Chance
    level is ln(10) = 2.30; a model that has learnt digits is far below a tenth of it; the
    first 200 steps include the warm-up from chance.
    """
    run_dir = tmp_path / "long"
    overrides = [
        "logger=csv", "trainer=cpu", *SMALL_MODEL, "quant=q8_bifurcated", "seed=0",
        "data.image_size=16", "data.batch_size=32",
        # 1,257 training images: 39 batches of 32 an epoch; 52 epochs hold 2,028 steps, so the
        # run ends at max_steps, with the cosine schedule spread over 52 epochs
        "trainer.max_steps=2000", "trainer.max_epochs=52", "trainer.log_every_n_steps=1",
        "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.enable_checkpointing=false",
        "~callbacks.model_checkpoint", "~callbacks.q8_stats", f"hydra.run.dir={run_dir}",
        "+callbacks.memory._target_=tests.test_app_faults.MemoryProbe",
        f"+callbacks.memory.path={tmp_path / 'memory.json'}",
        "+callbacks.memory.steps=[200,1000,2000]",
    ]
    result = subprocess.run([sys.executable, "train.py", *overrides], capture_output=True,
                            text=True, cwd=ROOT, env=_env(), timeout=3000)
    assert result.returncode == 0, result.stderr[-3000:]
    memory = {int(k): v for k, v in json.loads((tmp_path / "memory.json").read_text()).items()}
    assert memory[2000]["rss"] <= 1.05 * memory[200]["rss"], memory
    assert memory[2000]["objects"] - memory[1000]["objects"] < 500, memory
    losses = [loss for _, loss in sorted(_step_losses(run_dir).items())]
    assert len(losses) == 2000
    assert all(math.isfinite(loss) for loss in losses)
    first, last = sum(losses[:200]) / 200, sum(losses[-200:]) / 200
    assert last < math.log(10) / 10, (first, last)
    assert last < first / 2, (first, last)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"batch_size": 0}, r"data\.batch_size=0 is invalid: it must be an integer >= 1"),
        ({"batch_size": -4}, r"data\.batch_size=-4 is invalid"),
        ({"batch_size": 2.5}, r"data\.batch_size=2\.5 is invalid"),
        ({"batch_size": None}, r"data\.batch_size=None is invalid"),
        ({"batch_size": True}, r"data\.batch_size=True is invalid"),
        ({"batch_size": 8, "eval_batch_size": 0}, r"data\.eval_batch_size=0 .* >= 1"),
        ({"batch_size": 8, "image_size": -8}, r"data\.image_size=-8 is invalid: .* >= 1"),
        ({"batch_size": 8, "image_size": 0}, r"data\.image_size=0 is invalid"),
        ({"batch_size": 8, "num_workers": -1}, r"data\.num_workers=-1 is invalid: .* >= 0"),
        ({"num_samples": 0}, r"data\.num_samples=0 is invalid: .* >= 1"),
        ({"in_chans": 0}, r"data\.in_chans=0 is invalid"),
        ({"num_classes": 2.0}, r"data\.num_classes=2\.0 is invalid"),
    ],
)
def test_data_sizes_out_of_range_are_refused(data: dict, message: str) -> None:
    from q8.lit.errors import UsageError
    from q8.lit.validate import check_data_config

    with pytest.raises(UsageError, match=message):
        check_data_config(data)


def test_valid_and_absent_data_sizes_pass() -> None:
    from q8.lit.validate import check_data_config

    check_data_config({"batch_size": 1, "eval_batch_size": None, "image_size": 1,
                       "num_workers": 0})
    check_data_config({"root": "/somewhere"})  # a data set without these keys


def _resnet18(quantized: bool, in_chans: int = 1):
    from q8 import QuantConfig, quantize_model
    from q8.lit.models import create_backbone

    model = create_backbone("resnet18", 10, in_chans, False, {"zero_init_last": True})
    return quantize_model(model, QuantConfig()) if quantized else model


def _digits(batch_size: int, image_size: int):
    from q8.lit.data import DigitsDataModule

    return DigitsDataModule(batch_size=batch_size, image_size=image_size)


@pytest.mark.parametrize("quantized", [False, True], ids=["BatchNorm", "RangeBN"])
def test_a_batch_that_leaves_batchnorm_one_value_per_channel_is_refused(quantized: bool) -> None:
    """ResNet-18 reduces 32x32 images to 1x1 in layer4: a batch of one image leaves each BN
    channel a single value (BatchNorm raises; q8's BN twins would output zeros). 64x64 images
    (2x2 in layer4) or two images per batch are fine."""
    from q8.lit.errors import UsageError
    from q8.lit.validate import check_model_input

    model = _resnet18(quantized)
    with pytest.raises(UsageError, match=r"data\.batch_size=1 is too small: BatchNorm layer "
                                         r"layer4\.0\.bn1 .* use data\.batch_size >= 2"):
        check_model_input(model, _digits(batch_size=1, image_size=32))
    check_model_input(model, _digits(batch_size=2, image_size=32))
    check_model_input(model, _digits(batch_size=1, image_size=64))


def test_an_image_size_the_model_cannot_take_is_refused() -> None:
    from q8.lit.data import SyntheticDataModule
    from q8.lit.errors import UsageError
    from q8.lit.models import create_backbone
    from q8.lit.validate import check_model_input

    vit = create_backbone("test_vit", 10, 3)  # a fixed input size, like every plain ViT
    size = vit.patch_embed.img_size[0]
    check_model_input(vit, SyntheticDataModule(image_size=size, num_classes=10))
    with pytest.raises(UsageError, match=rf"cannot take the data's images \(data\.image_size="
                                         rf"{size + 8}, 3 channels\)"):
        check_model_input(vit, SyntheticDataModule(image_size=size + 8, num_classes=10))


def test_the_model_check_changes_no_state() -> None:
    """It runs before training: the run's weights, buffers, mode and random stream stay as
    they were, so a checked run trains exactly as an unchecked one."""
    from q8.lit.validate import check_model_input

    model = _resnet18(quantized=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_model_input(model, _digits(batch_size=8, image_size=16))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_data_module_refuses_negative_workers() -> None:
    from q8.lit.data import DigitsDataModule
    from q8.lit.errors import UsageError

    with pytest.raises(UsageError, match=r"data\.num_workers=-1 is invalid"):
        DigitsDataModule(num_workers=-1)


@pytest.fixture
def _wandb_state_reset():
    import wandb

    wandb.teardown()  # the W&B singleton keeps its settings between runs of one process:
    yield  # an earlier test's offline session would make this one ignore WANDB_MODE
    wandb.teardown()


@pytest.mark.parametrize("mode", ["online", "bogus"])
def test_wandb_misconfiguration_falls_back_to_offline(
    mode: str, tiny_config, tmp_path: Path, monkeypatch, caplog, _wandb_state_reset,
    _threads_restored,
) -> None:
    """WANDB_MODE=online without an API key (or an invalid WANDB_MODE): the run warns and
    logs offline instead of dying."""
    from train import train

    monkeypatch.setenv("WANDB_MODE", mode)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    run_dir = tmp_path / "run"
    with caplog.at_level("WARNING"):
        metrics = train(tiny_config(*SMALL_MODEL, "logger=wandb", run_dir=run_dir))
    assert metrics["global_step"] == 2
    assert any("continuing offline" in r.getMessage() for r in caplog.records)
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.parametrize("kwargs", [{"num_samples": 0}, {"in_chans": 0}, {"image_size": -1}])
def test_data_modules_refuse_sizes_out_of_range(kwargs: dict) -> None:
    """Built directly (not through train.py), the data modules run the same check."""
    from q8.lit.data import DigitsDataModule, SyntheticDataModule
    from q8.lit.errors import UsageError

    with pytest.raises(UsageError, match=rf"data\.{next(iter(kwargs))}=-?\d+ is invalid"):
        SyntheticDataModule(**kwargs)
    if "image_size" in kwargs:
        with pytest.raises(UsageError, match=r"data\.image_size=-1 is invalid"):
            DigitsDataModule(**kwargs)


def _image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> Path:
    """root/{train,val}/<class>/<i>.png: small RGB images of one colour per class."""
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(folder / f"{i}.png")
    return root


def test_image_folder_names_an_empty_class_or_a_class_mismatch(tmp_path: Path) -> None:
    from q8.lit.data import ImageFolderDataModule
    from q8.lit.errors import DatasetNotFoundError

    root = _image_folder(tmp_path / "data")
    assert ImageFolderDataModule(str(root), image_size=8).num_classes == 2
    (root / "val" / "bird").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"class folder .*val/bird holds no image"):
        ImageFolderDataModule(str(root), image_size=8)
    (root / "val" / "bird" / "0.png").write_bytes((root / "val" / "cat" / "0.png").read_bytes())
    with pytest.raises(DatasetNotFoundError, match=r"other classes than .*train: bird"):
        ImageFolderDataModule(str(root), image_size=8)
    with pytest.raises(DatasetNotFoundError, match=r"image folder for train not found"):
        ImageFolderDataModule(str(tmp_path / "nowhere"), image_size=8)


def test_a_corrupt_image_is_skipped_with_a_warning_naming_it(tmp_path: Path) -> None:
    """A damaged file yields the next image that can be read (same batch size, same order on
    every run), warned about once; a folder with no readable image stops with an error."""
    from q8.lit.data import SkippingImageFolder
    from q8.lit.errors import UsageError

    root = _image_folder(tmp_path / "data")
    bad = root / "train" / "cat" / "1.png"
    bad.write_bytes(b"\x89PNG truncated")
    images = SkippingImageFolder(str(root / "train"), transform=lambda im: torch.tensor(im.size))
    assert len(images) == 6
    with pytest.warns(UserWarning, match=rf"skipping image {re.escape(str(bad))}"):
        skipped = images[1]
    assert skipped[1] == images[2][1] == 0 and torch.equal(skipped[0], images[2][0])
    loader = torch.utils.data.DataLoader(images, batch_size=3)
    assert [len(y) for _, y in loader] == [3, 3]
    for f in (root / "train").rglob("*.png"):
        f.write_bytes(b"not an image")
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="images in a row .* cannot"):
        images[0]
