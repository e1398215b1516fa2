"""Distributed training: DDP through Lightning's launcher and torchrun on CPU, one run directory
written by rank 0, identical weights on every rank, Range BN per replica or synchronised, DDP's
start-up and collective time-outs, a lost rank or a signal stopping every rank, the SLURM script
(requeue included) and launcher config, the Docker install, the README's cluster commands.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from q8.lit import launch
from tests.conftest import ROOT, TINY, TINY_DIGITS, compose_config

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"

# Two ranks x 3 steps of 16 digits at 16x16, W&B offline: one epoch, then test.
DDP_RUN = [
    *[o for o in TINY if not o.startswith(("logger=", "trainer=", "trainer.limit_train"))],
    *TINY_DIGITS,
    "trainer=ddp_cpu",
    "logger=wandb",
    "trainer.limit_train_batches=3",
    "callbacks.q8_stats.log_every_n_steps=0",
    "threads=1",
]
_LAUNCH_VARIABLES = ("Q8_RUN_ID", "Q8_CONTAINER", "Q8_IMAGE", "TORCHELASTIC_RUN_ID",
                     "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                     "WORLD_SIZE", *launch.RANK_VARIABLES)


def _env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's or SLURM's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCH_VARIABLES and not k.startswith("SLURM_")}
    return {**env, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1", **extra}


class RankProbe(L.Callback):
    """Test-only: each rank saves what it trained on and holds: its first labels, its RNG state
    once training started, its BN running statistics after the last training step (before
    validation), and its parameters at the end."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "labels" not in self.record:
            self.record["labels"] = batch[1].tolist()
            self.record["rng"] = torch.get_rng_state()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["bn_stats"] = {k: v.clone() for k, v in pl_module.state_dict().items()
                                   if k.endswith(("running_mean", "running_var"))}

    def on_fit_end(self, trainer, pl_module):
        self.path.mkdir(parents=True, exist_ok=True)
        params = {k: p.detach().clone() for k, p in pl_module.named_parameters()}
        torch.save({**self.record, "rank": trainer.global_rank,
                    "world_size": trainer.world_size, "params": params},
                   self.path / f"rank{trainer.global_rank}.pt")


def _probe(path: Path) -> list[str]:
    return ["+callbacks.probe._target_=tests.test_distributed.RankProbe",
            f"+callbacks.probe.path={path}"]


def _run(cmd: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(**extra_env),
                            timeout=480)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    return result


def _check_one_run(root: Path, run_dir: Path) -> dict:
    """Rank 0 alone wrote: one metrics.json, one W&B run, one .hydra, one log file."""
    assert sorted(root.rglob("metrics.json")) == [run_dir / "metrics.json"]
    assert [p.parent for p in root.rglob("offline-run-*")] == [run_dir / "wandb"]
    assert sorted(root.rglob(".hydra")) == [run_dir / ".hydra"]
    assert [p.name for p in root.rglob("*.log") if "wandb" not in p.parts] == ["train.log"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3 and metrics["test/acc"] is not None
    return metrics


def _ranks(probe: Path) -> list[dict]:
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    return ranks


def _assert_ranks_hold_the_same_weights(ranks: list[dict], run_dir: Path) -> None:
    first, second = ranks
    # Different shards and independent noise: equal weights come from DDP's all-reduce alone.
    assert first["labels"] != second["labels"]
    assert not torch.equal(first["rng"], second["rng"])
    assert first["params"].keys() == second["params"].keys() and first["params"]
    unequal = [k for k in first["params"] if not torch.equal(first["params"][k],
                                                               second["params"][k])]
    assert unequal == []
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in first["params"].items())


def _differing_bn_stats(ranks: list[dict]) -> list[str]:
    first, second = (r["bn_stats"] for r in ranks)
    assert first.keys() == second.keys() and len(first) >= 40  # ResNet-18: 20 BN x 2
    return [k for k in first if not torch.equal(first[k], second[k])]


@pytest.mark.slow  # a 2-process run; the torchrun run below checks the same, with synced Range BN
def test_lightning_launched_ddp_cpu_run_is_one_run_with_identical_weights(tmp_path):
    """`python train.py trainer=ddp_cpu`: Lightning starts rank 1 itself; per-replica Range BN."""
    run_dir, probe = tmp_path / "run", tmp_path / "probe"
    _run([sys.executable, "train.py", *DDP_RUN, f"hydra.run.dir={run_dir}", *_probe(probe)])
    _check_one_run(tmp_path, run_dir)
    ranks = _ranks(probe)
    _assert_ranks_hold_the_same_weights(ranks, run_dir)
    differing = _differing_bn_stats(ranks)  # each rank's own batch statistics
    assert sum(k.endswith("running_var") for k in differing) == 20  # every Range BN layer


def test_torchrun_run_shares_a_derived_run_dir_and_syncs_range_bn(tmp_path):
    """torchrun: every rank runs hydra.main and derives the same run dir; sync_range_bn=true
    makes every rank's Range BN statistics (hence running stats) those of the global batch."""
    log_dir, probe = tmp_path / "outputs", tmp_path / "probe"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py",
          *DDP_RUN, "quant=q8_paper", "sync_range_bn=true", *_probe(probe)],
         Q8_LOG_DIR=str(log_dir))
    (run_dir,) = (log_dir / "runs").iterdir()
    assert run_dir.name.startswith("torchrun-")
    _check_one_run(tmp_path, run_dir)
    ranks = _ranks(probe)
    _assert_ranks_hold_the_same_weights(ranks, run_dir)
    assert _differing_bn_stats(ranks) == []


# ---------------------------------------------------------------- run directory and ranks


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"Q8_RUN_ID": "mine", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "q8"}, "mine"),
    ({"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "q8", "SLURM_PROCID": "3"}, "slurm-4242"),
    ({"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "3",
      "SLURM_JOB_NAME": "q8"}, "slurm-4240_3"),
    ({"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "interactive"}, None),
    ({"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "q8", "TORCHELASTIC_RUN_ID": "abc"},
     "slurm-4242"),
    ({"TORCHELASTIC_RUN_ID": "abc", "RANK": "1"}, "torchrun-abc"),
], ids=["none", "explicit", "slurm", "slurm-array", "salloc-shell", "slurm-over-torchrun",
        "torchrun"])
def test_run_id_is_shared_by_every_rank(env, expected):
    assert launch.run_id(env) == expected


def test_torchrun_without_rendezvous_id_names_the_run_after_its_parent():
    env = {"TORCHELASTIC_RUN_ID": "none"}
    name = launch.run_id(env)
    assert name == launch.run_id(env)  # every local rank has the same parent
    assert name.startswith("torchrun-") and name.endswith(f"-{os.getppid()}")


@pytest.mark.parametrize(("env", "zero"), [
    ({}, True), ({"RANK": "0", "LOCAL_RANK": "0"}, True), ({"RANK": "3"}, False),
    ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False),
    ({"SLURM_PROCID": "0"}, True), ({"SLURM_PROCID": "5"}, False),
])
def test_rank_zero_from_the_launchers_variables(env, zero):
    assert launch.is_rank_zero(env) is zero


def test_launch_overrides_quiet_other_ranks_and_export_the_run_id():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "q8", "SLURM_PROCID": "1"}
    assert launch.launch_overrides(["seed=1"], env) == [
        "hydra.output_subdir=null", "hydra/job_logging=stdout"]
    assert env["Q8_RUN_ID"] == "slurm-4242"
    # what the user or Lightning's launcher already chose stays
    assert launch.launch_overrides(["hydra.output_subdir=null"], {"LOCAL_RANK": "1"}) == [
        "hydra/job_logging=stdout"]
    rank_zero = {"RANK": "0", "TORCHELASTIC_RUN_ID": "x"}
    assert launch.launch_overrides([], rank_zero) == []
    assert rank_zero["Q8_RUN_ID"] == "torchrun-x"


def test_requeued_slurm_job_composes_the_same_run_dir(monkeypatch):
    """The run dir depends on the job id only: a requeued job (same id, later start) finds
    its predecessor's hpc_ckpt_<n>.ckpt there."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.delenv("Q8_LOG_DIR", raising=False)
    dirs = []
    for restart in ("0", "1"):
        env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "q8", "SLURM_RESTART_COUNT": restart}
        launch.launch_overrides([], env)
        monkeypatch.setenv("Q8_RUN_ID", env["Q8_RUN_ID"])
        compose_config(["trainer=ddp"])
        dirs.append(HydraConfig.get().run.dir)
    assert dirs == ["outputs/runs/slurm-4242"] * 2
    monkeypatch.delenv("Q8_RUN_ID")
    compose_config([])
    assert re.fullmatch(r"outputs/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", HydraConfig.get().run.dir)


def test_ddp_trainer_configs(monkeypatch):
    for name in ("LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ddp = compose_config(["trainer=ddp"]).trainer
    assert (ddp.accelerator, ddp.devices, ddp.num_nodes) == ("gpu", -1, 1)
    assert ddp.strategy._target_ == "q8.lit.distributed.DDPStrategy"
    assert (ddp.strategy.timeout.minutes, ddp.strategy.start_timeout.minutes) == (5, 15)
    assert ddp.sync_batchnorm is False and "precision" not in ddp  # Q8Precision's: 32-true
    q8_plugin = ddp.plugins[0]
    assert q8_plugin._target_ == "q8.lightning.Q8Precision" and q8_plugin.sync_range_bn is False
    cpu = compose_config(["trainer=ddp_cpu"]).trainer
    assert (cpu.accelerator, cpu.devices, cpu.sync_batchnorm) == ("cpu", 2, False)
    assert cpu.strategy == ddp.strategy
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node=4 --nnodes=3
    monkeypatch.setenv("GROUP_WORLD_SIZE", "3")
    for name in ("ddp", "ddp_cpu"):
        trainer = compose_config([f"trainer={name}"]).trainer
        assert (trainer.devices, trainer.num_nodes) == (4, 3)
    assert compose_config([]).sync_range_bn is False


def test_close_log_files_off_rank_zero(tmp_path):
    import logging

    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(handler)
    try:
        launch.close_log_files_off_rank_zero({})
        assert handler in root.handlers
        launch.close_log_files_off_rank_zero({"SLURM_PROCID": "2"})
        assert handler not in root.handlers
    finally:
        root.removeHandler(handler)
        handler.close()


def test_ddp_strategy_waits_start_timeout_to_start_then_timeout_per_collective(monkeypatch):
    """The rendezvous (the store through which every rank joins) waits `start_timeout`, so a rank
    that starts slowly on a loaded machine still joins; the process group's collectives then wait
    `timeout`: how long the others wait for a rank that died or hangs."""
    import socket
    from datetime import timedelta

    import torch.distributed as dist
    from lightning.fabric.plugins.environments import LightningEnvironment

    from q8.lit.distributed import DDPStrategy

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(free.getsockname()[1]))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    strategy = DDPStrategy(parallel_devices=[torch.device("cpu")],
                           cluster_environment=LightningEnvironment(),
                           timeout=timedelta(seconds=7), start_timeout=timedelta(minutes=15))
    strategy.setup_distributed()  # a group of one rank: this process, over gloo
    try:
        store = dist.distributed_c10d._get_default_store()
        gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        assert store.timeout == timedelta(minutes=15)
        assert gloo.options._timeout == timedelta(seconds=7)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------- Range BN sync plugin, RNG


def test_q8precision_sync_range_bn_syncs_every_range_bn_layer_it_made(caplog):
    import logging

    from q8.lightning import Q8Precision
    from q8.norm import RangeNormMixin

    def model() -> nn.Module:
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))

    paper = {"bn": "range"}
    synced = Q8Precision(paper, sync_range_bn=True).convert_module(model())
    layers = [m for m in synced.modules() if isinstance(m, RangeNormMixin)]
    assert len(layers) == 2 and all(m.q8_sync == "world" for m in layers)
    assert all(isinstance(m, nn.BatchNorm2d) for m in layers)  # not made SyncBatchNorm
    plain = Q8Precision(paper).convert_module(model())
    assert all(m.q8_sync is None for m in plain.modules() if isinstance(m, RangeNormMixin))
    assert type(pickle.loads(pickle.dumps(Q8Precision(sync_range_bn=True)))) is Q8Precision

    with caplog.at_level(logging.WARNING, logger="q8"):  # nothing to sync: said, not silent
        Q8Precision(sync_range_bn=True).convert_module(model())  # the default BN
    assert "no Range BN layer" in caplog.text


def test_exact_resume_forks_one_common_state_into_one_stream_per_rank():
    from callbacks.exact_resume import ExactResume

    callback = ExactResume()

    def state_after_start(rank: int, world_size: int = 2) -> torch.Tensor:
        torch.manual_seed(0)  # seed_everything: the same on every rank
        callback.on_train_start(SimpleNamespace(world_size=world_size, global_rank=rank), None)
        return torch.get_rng_state()

    r0, r1 = state_after_start(0), state_after_start(1)
    assert not torch.equal(r0, r1)
    assert torch.equal(r0, state_after_start(0))  # reproducible
    torch.manual_seed(0)
    assert torch.equal(state_after_start(0, world_size=1), torch.get_rng_state())  # no-op


# ---------------------------------------------------------------- SLURM


def _stand_in(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _task_path(tmp_path: Path) -> str:
    """PATH of a task: stand-ins (tmp/bin), then this interpreter's environment."""
    return f"{tmp_path / 'bin'}:{Path(sys.executable).parent}:{os.environ['PATH']}"


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A one-node SLURM job as its batch script sees it; tmp/ctl holds a stand-in scontrol."""
    return _env(**{
        "PATH": f"{tmp_path / 'ctl'}:{_task_path(tmp_path)}", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "q8", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
        "SLURM_SUBMIT_DIR": str(ROOT), "Q8_LOG_DIR": str(tmp_path / "outputs"),
        "Q8_DATA_DIR": str(tmp_path / "data"), **extra})


@pytest.mark.parametrize("container", ["pyxis", "apptainer", "none"])
def test_sbatch_script_runs_one_task_per_gpu_in_the_image(tmp_path, container):
    (tmp_path / "bin").mkdir()
    _stand_in(tmp_path / "bin" / "srun",
              'printf "%s\\n" "$@" > "$SRUN_ARGS"; env > "$SRUN_ENV"\n')
    env = _slurm_env(tmp_path, Q8_CONTAINER=container, SLURM_NTASKS_PER_NODE="8",
                     SLURM_JOB_NUM_NODES="4", SRUN_ARGS=str(tmp_path / "args"),
                     SRUN_ENV=str(tmp_path / "env"))
    result = subprocess.run(["bash", str(SBATCH), "experiment=imagenet_resnet50", "seed=3"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    train = args[args.index("train.py") - 1:]
    assert train == ["python", "train.py", "trainer=ddp", "trainer.devices=8",
                     "trainer.num_nodes=4", "experiment=imagenet_resnet50", "seed=3"]
    log_dir, data_dir = tmp_path / "outputs", tmp_path / "data"
    mounts = f"{log_dir}:{log_dir},{data_dir}:{data_dir}"
    expected = {
        "pyxis": ["--container-image=q8.sqsh", f"--container-mounts={mounts}",
                  "--container-workdir=/workspace"],
        "apptainer": ["apptainer", "exec", "--nv", "--bind", mounts, "--pwd", "/workspace",
                      "q8.sif"],
        "none": [],
    }[container]
    assert args[: len(args) - len(train)] == expected
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines()
                if "=" in line)
    assert seen["WANDB_MODE"] == "offline" and seen["Q8_RUN_ID"] == "slurm-4242"
    assert (log_dir / "runs" / "slurm-4242").is_dir()
    directives = re.findall(r"^#SBATCH (\S+)", SBATCH.read_text(), re.M)
    assert {"--signal=B:USR1@180", "--requeue"} <= set(directives)


def _as_bash42(script: str) -> str:
    """The script with bash 4.2's `set -u` rule made explicit: before bash 4.4, expanding an
    empty array ("${a[@]}", "${a[*]}") is an "unbound variable" error. `${a[@]?}` raises that
    error on an empty array in any bash."""
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\[([@*])\]\}", r"${\1[\2]?}", script)


def test_bash42_rewrite_fails_on_an_empty_array(tmp_path):
    script = tmp_path / "s.sh"
    script.write_text(_as_bash42('set -u\na=()\necho "${a[@]}"\n'))
    assert subprocess.run(["bash", str(script)], capture_output=True).returncode != 0
    script.write_text(_as_bash42('set -u\na=(x)\necho "${a[@]}"\n'))
    assert subprocess.run(["bash", str(script)], capture_output=True).returncode == 0


@pytest.mark.parametrize("bash42", [False, True], ids=["bash", "bash4.2"])
@pytest.mark.parametrize("overrides", [["seed=3"], []], ids=["overrides", "none"])
@pytest.mark.parametrize("newest", ["hpc_ckpt_2.ckpt", "checkpoints/last.ckpt", None])
def test_sbatch_script_resumes_from_the_newest_checkpoint(tmp_path, newest, overrides, bash42):
    """Also under bash 4.2's rules: a fresh job (no checkpoint) with no overrides has nothing to
    add to the command line, and must not expand an empty array."""
    (tmp_path / "bin").mkdir()
    _stand_in(tmp_path / "bin" / "srun", 'printf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    run_dir = tmp_path / "outputs" / "runs" / "slurm-4242"
    if newest:  # hpc_ckpt_1 (USR1), last.ckpt (SIGTERM), hpc_ckpt_2: `newest` written last
        names = ["hpc_ckpt_1.ckpt", "checkpoints/last.ckpt", "hpc_ckpt_2.ckpt"]
        for age, name in enumerate(sorted(names, key=lambda n: n == newest)):
            (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (run_dir / name).write_bytes(b"")
            os.utime(run_dir / name, (1e9 + age, 1e9 + age))
    script = SBATCH
    if bash42:
        script = tmp_path / "train.sbatch"
        script.write_text(_as_bash42(SBATCH.read_text()))
    env = _slurm_env(tmp_path, Q8_CONTAINER="none", SRUN_ARGS=str(tmp_path / "args"))
    result = subprocess.run(["bash", str(script), *overrides], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "args").read_text().splitlines()
    resume = [f"ckpt_path={run_dir / newest}"] if newest else []
    assert args[5:] == [*resume, *overrides]


@pytest.mark.slow  # two training runs in sequence: about 90 s
def test_sbatch_requeue_saves_hpc_ckpt_and_the_requeued_job_resumes(tmp_path):
    """The requeue cycle without SLURM: USR1 to the batch script (as --signal=B:USR1 sends it),
    the script passes it to the task, Lightning saves hpc_ckpt_1.ckpt, its own `scontrol`
    fails as in a container, the script requeues, 'SLURM' sends SIGTERM and the task saves
    last.ckpt; the requeued job (same job id) resumes from it in the same run directory."""
    for sub in ("bin", "ctl"):
        (tmp_path / sub).mkdir()
    # srun: run the command in place, without scontrol on PATH (as inside a container)
    _stand_in(tmp_path / "bin" / "srun", f'while [[ $1 == -* ]]; do shift; done\n'
              f'export PATH="{_task_path(tmp_path)}"\nexec "$@"\n')
    # scontrol requeue: record it, then stop the job's processes (SIGTERM) as SLURM does
    _stand_in(tmp_path / "ctl" / "scontrol",
              f'echo "$@" >> "{tmp_path / "scontrol.log"}"\nkill -TERM 0\n')
    overrides = [*[o for o in TINY if not o.startswith(("trainer.max_epochs",
                                                          "trainer.limit_train"))],
                 *TINY_DIGITS, "trainer.max_epochs=2", "trainer.limit_train_batches=15",
                 "callbacks.q8_stats.log_every_n_steps=0", "threads=1"]
    run_dir = tmp_path / "outputs" / "runs" / "slurm-4242"

    job = subprocess.Popen(["bash", str(SBATCH), *overrides], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env=_slurm_env(tmp_path, Q8_CONTAINER="none"))
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "last.ckpt").exists() and job.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    assert job.poll() is None, job.stdout.read()[-3000:]
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=240)
    # Lightning's own `scontrol requeue` failed (none on the task's PATH): the script's ran
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n", out[-3000:]
    assert "Stopped by a signal" in out  # SIGTERM after the requeue: last.ckpt saved too
    steps = {name: torch.load(run_dir / name, map_location="cpu", weights_only=True)[
        "global_step"] for name in ("hpc_ckpt_1.ckpt", "checkpoints/last.ckpt")}
    assert 15 <= steps["hpc_ckpt_1.ckpt"] <= steps["checkpoints/last.ckpt"] < 30, steps
    assert not (run_dir / "metrics.json").exists()

    requeued = subprocess.run(["bash", str(SBATCH), *overrides], capture_output=True, text=True,
                              env=_slurm_env(tmp_path, Q8_CONTAINER="none",
                                             SLURM_RESTART_COUNT="1"), timeout=300)
    assert requeued.returncode == 0, requeued.stdout[-3000:] + requeued.stderr[-3000:]
    assert f"resuming {run_dir / 'checkpoints' / 'last.ckpt'}" in requeued.stdout
    assert [p.name for p in (tmp_path / "outputs" / "runs").iterdir()] == ["slurm-4242"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["start_step"] == steps["checkpoints/last.ckpt"]
    assert metrics["global_step"] == 30


def test_slurm_launcher_config_builds_submitit_jobs(tmp_path, monkeypatch):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="hydra/launcher=slurm needs `pip install -e '.[slurm]'`")
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=8",
            "hydra.launcher.partition=gpu", "trainer=ddp"])
    GlobalHydra.instance().clear()
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = dict(launcher.params)
    assert params["tasks_per_node"] == params["gpus_per_node"] == 8
    # the mapping SlurmLauncher.launch() makes, checked by submitit itself (it wants an srun)
    (tmp_path / "bin").mkdir()
    _stand_in(tmp_path / "bin" / "srun", "exit 0\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    base = set(BaseQueueConf.__dataclass_fields__)
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    text = executor._executor._make_submission_file_text("python -c pass", "uid")
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --partition=gpu", "export WANDB_MODE=offline"):
        assert line in text


# ---------------------------------------------------------------- Docker and README


def test_dockerfile_installs_like_ci():
    """One source of truth: the image runs `make setup`'s pip command (what CI runs), with the
    same pins but torch's (the image keeps its base image's CUDA build)."""
    make = re.search(r"\$\(BIN\)/python (-m pip install .*)", (ROOT / "Makefile").read_text())
    docker = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"^RUN python (-m pip install [^&\n]*?)\s*(?:&&|$)", docker, re.M)
    assert installs == [make.group(1).replace("-c constraints-torch.txt ", "").strip()]
    assert "-c constraints.txt" in installs[0]
    assert re.search(r"^ARG BASE_IMAGE=pytorch/pytorch:\S+-cuda", docker, re.M)
    assert 'ENTRYPOINT ["python", "train.py"]' in docker
    assert re.search(r"^ENV HOME=/tmp", docker, re.M)  # writable by any UID
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "outputs", "data", "*.ckpt"} <= ignored


def _readme_cluster_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## GPU and cluster\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def test_readme_cluster_commands_match_the_files():
    """Every command of the README's cluster section names files that exist and overrides
    that compose (a sweep's first point)."""
    commands = _readme_cluster_commands()
    assert {c[0] for c in commands} == {"python", "torchrun", "sbatch", "docker"}
    has_launcher = True
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        has_launcher = False
    directives = {d.split("=")[0] for d in re.findall(r"^#SBATCH (\S+)", SBATCH.read_text(), re.M)}
    for command in commands:
        if command[:2] == ["docker", "build"]:
            assert command[-1] == "." and (ROOT / "Dockerfile").is_file()
            continue
        if command[0] == "docker":
            args = command[command.index("q8") + 1:]
        elif command[0] == "sbatch":
            script = next(a for a in command if not a.startswith("-") and a != "sbatch")
            assert ROOT / script == SBATCH, command
            assert {o.split("=")[0] for o in command[1:command.index(script)]} <= directives
            args = command[command.index(script) + 1:]
        else:
            args = command[command.index("train.py") + 1:]
        overrides = [a.split(",")[0] if "=" in a else a for a in args if a != "-m"]
        if "hydra/launcher=slurm" in overrides:
            assert (ROOT / "conf" / "hydra" / "launcher" / "slurm.yaml").is_file()
            if not has_launcher:
                overrides = [o for o in overrides if not o.startswith("hydra")]
        compose_config(overrides)


class FailOnRank(L.Callback):
    """Test-only: after `step` optimizer steps rank `rank` writes the time to `marker`, then kills
    itself with SIGKILL (as the OOM killer or a hardware fault would) or, with how="hang", stops
    answering."""

    def __init__(self, rank: int, step: int, marker: str, how: str = "kill") -> None:
        self.rank, self.step, self.marker, self.how = rank, step, Path(marker), how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step >= self.step:
            self.marker.write_text(str(time.time()))
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)


COLLECTIVE_TIMEOUT_S = 30  # the hang case's; start-up has its own, start_timeout (15 min)


# the hang waits out the collective time-out: about a minute on 2 cores
@pytest.mark.parametrize("how", ["kill", pytest.param("hang", marks=pytest.mark.slow)])
def test_a_rank_that_dies_or_hangs_stops_the_run_naming_it(tmp_path, how):
    """Rank 1 of 2 dies (SIGKILL) or hangs at step 2: rank 0 exits with one line naming the
    dead rank, and no process is left behind. A dead rank's closed socket fails the others'
    next collective at once; a hung rank's after the collective time-out (30 s here, 5 min in
    conf/trainer/ddp*.yaml)."""
    marker = tmp_path / "failed_at"
    timeout = [f"trainer.strategy.timeout.minutes={COLLECTIVE_TIMEOUT_S / 60}"] * (how == "hang")
    cmd = [sys.executable, "train.py", *DDP_RUN, "trainer.limit_train_batches=30",
           f"hydra.run.dir={tmp_path / 'run'}", *timeout,
           "+callbacks.fail._target_=tests.test_distributed.FailOnRank",
           "+callbacks.fail.rank=1", "+callbacks.fail.step=2", f"+callbacks.fail.how={how}",
           f"+callbacks.fail.marker={marker}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    assert marker.is_file(), stderr[-3000:]  # rank 1 failed at step 2, not while starting
    after_failure = time.time() - float(marker.read_text())
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: rank 0 lost the process group: "), line
    dead = "died (signal SIGKILL)" if how == "kill" else "stopped answering and was killed"
    assert re.search(rf"rank 1 \(pid \d+\) {re.escape(dead)}", line), line
    if how == "hang":  # the collective gave up after the timeout, not at a closed socket
        assert re.search(r"time(d )?out", line.lower()), line  # gloo says either
        assert COLLECTIVE_TIMEOUT_S - 5 < after_failure < COLLECTIVE_TIMEOUT_S + 30, after_failure
    else:  # the closed socket: at once
        assert after_failure < 30, after_failure
    children = subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True,
                              text=True).stdout.split()
    assert not children, children


@pytest.mark.slow  # about 40 s on 2 CPU cores
def test_500_step_ddp_soak_stays_finite_with_flat_memory(tmp_path):
    """2 gloo processes, 500 steps of q8_bifurcated on a small ResNet: every loss finite (NanGuard
    stops a run at the first non-finite gradient, so exit code 0 says none occurred on rank 0),
    the loss below chance, and rank 0's resident memory at step 500 within 5% of step 100's."""
    from tests.test_app_faults import SMALL_MODEL, _step_losses

    run_dir = tmp_path / "run"
    overrides = [
        *[o for o in DDP_RUN
          if not o.startswith(("logger=", "trainer.limit_train", "threads", "trainer.max_ep"))],
        *SMALL_MODEL, "logger=csv", "quant=q8_bifurcated", "trainer.max_steps=500",
        "trainer.max_epochs=13", "~callbacks.model_checkpoint",
        "trainer.enable_checkpointing=false", f"hydra.run.dir={run_dir}",
        "+callbacks.memory._target_=tests.test_app_faults.MemoryProbe",
        f"+callbacks.memory.path={tmp_path / 'memory.json'}", "+callbacks.memory.steps=[100,500]",
    ]
    result = subprocess.run([sys.executable, "train.py", *overrides], capture_output=True,
                            text=True, cwd=ROOT, env=_env(), timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = [loss for _, loss in sorted(_step_losses(run_dir).items())]
    assert len(losses) >= 490 and all(math.isfinite(v) for v in losses), len(losses)
    assert sum(losses[-50:]) / 50 < math.log(10) / 2, losses[-50:]
    memory = {int(k): v for k, v in json.loads((tmp_path / "memory.json").read_text()).items()}
    assert memory[500]["rss"] <= 1.05 * memory[100]["rss"], memory


@pytest.mark.slow  # three 2-process runs: about 50 s on 2 CPU cores
def test_ddp_mid_epoch_resume_reproduces_the_uninterrupted_run(tmp_path):
    """2 gloo processes, 2 epochs of 6 steps with stochastic rounding and augmentation; stopped
    after step 8 as a SIGTERM stops it (every rank, the same step), then resumed: each rank
    replays the rest of its shard of the epoch with its own RNG stream, so the run's history (both
    launches', joined) and the final metrics are the uninterrupted run's, to the bit."""
    from tests.test_app_faults import FINAL_KEYS, SMALL_MODEL, _step_losses

    run = [*[o for o in DDP_RUN if not o.startswith(("logger=", "trainer.limit_train",
                                                     "threads", "trainer.max_ep"))],
           *SMALL_MODEL, "logger=csv", "trainer.max_epochs=2", "trainer.limit_train_batches=6",
           "seed=5"]  # digits: augmentation on

    def train(name: str, *extra: str, code: int = 0) -> Path:
        result = subprocess.run([sys.executable, "train.py", *run, *extra,
                                 f"hydra.run.dir={tmp_path / name}"], capture_output=True,
                                text=True, cwd=ROOT, env=_env(), timeout=480)
        assert result.returncode == code, result.stderr[-3000:]
        return tmp_path / name

    full = train("full")
    stop = ["+callbacks.stop._target_=tests.test_app_faults.StopAfterStep",
            "+callbacks.stop.step=8"]
    stopped = train("stopped", *stop, code=143)
    ckpt = torch.load(stopped / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert ckpt["global_step"] == 8 and len(ckpt["rng_states_per_rank"]) == 2
    assert ckpt["DigitsDataModule"]["samples_done"] == 2 * 16  # 2 batches of 16 on each rank
    train("stopped", "ckpt_path=last")
    expected, got = (json.loads((d / "metrics.json").read_text()) for d in (full, stopped))
    assert got["start_step"] == 8
    assert min(_step_losses(stopped, last_launch=True)) == 8
    assert _step_losses(stopped) == _step_losses(full)  # both launches', joined
    assert {k: got[k] for k in FINAL_KEYS} == {k: expected[k] for k in FINAL_KEYS}


@pytest.mark.slow  # three 2-process runs: about a minute
def test_ddp_sigterm_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path):
    """A real SIGTERM to a `trainer=ddp_cpu` run (to rank 0, which Lightning started rank 1
    from and forwards it to): every rank stops at the same step, last.ckpt is written, exit
    143; the resumed run's later losses and final metrics are the uninterrupted run's."""
    from tests.test_app_faults import FINAL_KEYS, SMALL_MODEL, _step_losses

    run = [*[o for o in DDP_RUN if not o.startswith(("logger=", "trainer.limit_train",
                                                     "threads", "trainer.max_ep"))],
           *SMALL_MODEL, "logger=csv", "trainer.max_epochs=2", "trainer.limit_train_batches=12",
           "callbacks.model_checkpoint.last_every_n_train_steps=5", "seed=5"]

    def command(name: str, *extra: str) -> list[str]:
        return [sys.executable, "train.py", *run, *extra, f"hydra.run.dir={tmp_path / name}"]

    full = subprocess.run(command("full"), capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=480)
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen(command("stopped"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env())
    last = stopped / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, out[-3000:]
    step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 5 <= step < 24
    resumed = subprocess.run(command("stopped", "ckpt_path=last"), capture_output=True,
                             text=True, cwd=ROOT, env=_env(), timeout=480)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = (json.loads((d / "metrics.json").read_text())
                     for d in (tmp_path / "full", stopped))
    assert got["start_step"] == step
    assert min(_step_losses(stopped, last_launch=True)) == step
    assert _step_losses(stopped) == _step_losses(tmp_path / "full")  # both launches', joined
    assert {k: got[k] for k in FINAL_KEYS} == {k: expected[k] for k in FINAL_KEYS}


def _processes_mentioning(text: str) -> list[int]:
    """The pids whose command line contains `text` (a run's unique directory)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(
                errors="replace"
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the ranks")
def test_a_sigterm_while_ddp_starts_stops_every_rank(tmp_path):
    """SIGTERM to rank 0 as soon as it has started rank 1 (before fit's own handler is in
    place, or during the first steps: whichever the timing gives): both ranks exit 143 with a
    line saying so, and no rank is left behind waiting in a collective."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "train.py", *DDP_RUN, "logger=csv", f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env())
    lines = []
    for line in proc.stdout:  # rank 1 prints this once Lightning's launcher started it
        lines.append(line)
        if "GLOBAL_RANK: 1" in line:
            break
    assert proc.poll() is None, "".join(lines)[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)  # EOF: every rank has closed the shared stdout
    out = "".join(lines) + out
    assert proc.returncode == 143, out[-3000:]
    assert out.count("stopped by") == 2, out[-3000:]  # one line per rank
    assert _processes_mentioning(str(run_dir)) == []
