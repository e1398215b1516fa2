"""The training application: Hydra config, train.py's contract, errors, resume, metrics.json."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from q8.config import QuantConfig
from q8.lit.run_history import read_history, read_hparams, values
from tests.conftest import CONF_DIR, ROOT, TINY, TINY_DIGITS, compose_config
from train import build_quant_config, train

PRESETS = sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
METRIC_KEYS = {"train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"}
# Presets differ only in their QuantConfig, which the library's tests cover field by field: the
# default suite trains no quantization, the paper's default and standard BN; `-m slow` the rest.
TRAINED_BY_DEFAULT = ("fp32", "q8_bifurcated", "q8_batchnorm")


@pytest.mark.parametrize("preset", PRESETS)
def test_quant_preset_lists_every_quantconfig_field(preset: str) -> None:
    """Presets map 1:1 onto QuantConfig, so any `quant.<field>=` override is valid."""
    fields = yaml.safe_load((CONF_DIR / "quant" / f"{preset}.yaml").read_text())
    assert set(fields) == {f.name for f in dataclasses.fields(QuantConfig)}
    QuantConfig.from_dict(fields)


def test_presets_say_what_their_names_say() -> None:
    def load(name: str) -> QuantConfig:
        return build_quant_config(compose_config([f"quant={name}"]).quant)

    assert load("fp32").is_full_precision
    default = load("q8_bifurcated")
    assert default == QuantConfig()  # QuantConfig's defaults are the default preset
    assert default.bifurcated and default.wgrad_bits == 16 and default.float_bn
    paper = load("q8_paper")  # the paper's exact setting: Range BN on the 8-bit input
    assert paper == QuantConfig(bn="range", bn_compute="8bit", gates="8bit", act_ranges="tensor")
    assert default.act_ranges == "channel"
    assert not load("q8").bifurcated and load("q8").grad_bits == 8
    assert load("q8_nearest_grads").grad_rounding == "nearest"
    assert (load("q8_batchnorm").bn, load("q8_batchnorm").bn_compute) == ("batchnorm", "8bit")
    assert load("q4").weight_bits == load("q4").act_bits == load("q4").grad_bits == 4


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiments_compose(experiment: str) -> None:
    cfg = compose_config([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    build_quant_config(cfg.quant)


def test_default_config_is_the_paper_on_digits() -> None:
    cfg = compose_config([])
    assert (cfg.model.name, cfg.quant_name, cfg.data._target_.rsplit(".", 1)[1]) == (
        "resnet18",
        "q8_bifurcated",
        "DigitsDataModule",
    )
    assert cfg.trainer.accelerator == "auto"
    assert cfg.optimizer.momentum == 0.9 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.model.kwargs.zero_init_last


@pytest.mark.parametrize("preset", [p if p in TRAINED_BY_DEFAULT else
                                    pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def test_every_preset_trains_a_few_steps(preset: str, tiny_config, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    metrics = train(tiny_config(f"quant={preset}", run_dir=run_dir))
    assert metrics["global_step"] == 2
    assert metrics["quant"] == preset
    for key in METRIC_KEYS:
        assert 0 <= metrics[key] < float("inf"), key
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(saved) >= METRIC_KEYS
    assert 0 <= saved["test/acc"] <= 1 and saved["accuracy_unit"] == "fraction"
    assert saved["model"] == "resnet18" and saved["quant_config"]["grad_bits"] == (
        None if preset == "fp32" else metrics["quant_config"]["grad_bits"]
    )
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("gemm", ["codes", "int8"])
def test_a_gemm_mode_trains_and_is_recorded(gemm: str, tiny_config, tmp_path: Path) -> None:
    metrics = train(tiny_config(f"quant.gemm={gemm}", run_dir=tmp_path / "run"))
    assert metrics["global_step"] == 2 and metrics["quant_config"]["gemm"] == gemm
    assert 0 <= metrics["train/loss"] < float("inf")


def test_the_app_trains_through_the_q8precision_plugin(tiny_config, tmp_path: Path) -> None:
    """The module is a float classifier; the Trainer's Q8Precision quantizes it. Its checkpoints
    hold the float state_dict (loadable without q8) and the plugin's config and q8 buffers; a
    resume with another quant preset is refused."""
    import torch

    import q8
    from q8.lit import ClassifierModule, UsageError

    run_dir = tmp_path / "run"
    metrics = train(tiny_config("quant=q8_bifurcated", "trainer.max_epochs=2", run_dir=run_dir))
    best = Path(metrics["tested_checkpoint"])  # tested in 8 bits after fit: loaded into q8 twins
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    entry = ckpt["Q8Precision"]
    assert entry["config"] == metrics["quant_config"]
    assert "model.conv1.act_range" in entry["buffers"]
    assert not set(entry["buffers"]) & set(ckpt["state_dict"])
    plain = ClassifierModule.load_from_checkpoint(best)  # strict: exactly the float keys
    assert not any(isinstance(m, (q8.QuantConv2d, q8.QuantLinear)) for m in plain.modules())
    # the optimizer and the schedule are recorded as settings, not as objects to train with
    hparams = ckpt["hyper_parameters"]
    assert hparams["optimizer"] == {"_target_": "torch.optim.sgd.SGD", "lr": 0.1,
                                    "momentum": 0.9, "weight_decay": 1e-4, "nesterov": False}
    assert hparams["scheduler"]["_target_"] == "q8.lit.optim.warmup_cosine"
    assert plain.hparams.optimizer == hparams["optimizer"]
    with pytest.raises(UsageError, match="no optimizer or scheduler to train with"):
        plain.configure_optimizers()
    with pytest.raises(UsageError, match="incompatible.*quant="):
        train(tiny_config("quant=q8_fp32_wgrad", "ckpt_path=last", run_dir=run_dir))


TWO_EPOCHS = ("trainer.max_epochs=2", "test_weights=final")


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict]:
    """fp32_run(run_dir, *overrides): a finished tiny fp32 run (one epoch of 2 steps, or
    TWO_EPOCHS) copied to run_dir, and its metrics. Each is trained once in this module, for
    the tests that resume, damage or test it."""
    runs: dict[tuple[str, ...], tuple[Path, dict]] = {}

    def copy(run_dir: Path, *overrides: str) -> dict:
        if overrides not in runs:
            source = tmp_path_factory.mktemp("fp32") / "run"
            cfg = compose_config([*TINY, *TINY_DIGITS, "quant=fp32", *overrides],
                                 output_dir=source)
            runs[overrides] = source, train(cfg)
        source, metrics = runs[overrides]
        shutil.copytree(source, run_dir)
        return metrics

    return copy


def test_resume_continues_at_the_saved_step(tiny_config, fp32_run, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = fp32_run(run_dir)
    assert first["global_step"] == 2
    second = train(
        tiny_config("quant=fp32", "ckpt_path=last", "trainer.max_epochs=2", run_dir=run_dir)
    )
    assert second["start_step"] == 2
    assert second["global_step"] == 4 and second["epochs"] == 2


def test_test_weights_chooses_the_best_checkpoint_or_the_final_weights(
        fp32_run, tmp_path: Path) -> None:
    import torch

    best = fp32_run(tmp_path / "best")
    assert Path(best["tested_checkpoint"]).name.startswith("best-epoch")
    final = fp32_run(tmp_path / "final", *TWO_EPOCHS)
    assert final["tested_checkpoint"] == "final weights"
    # last.ckpt holds those final weights, whether or not the last epoch was the best
    last = torch.load(tmp_path / "final" / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)
    assert last["global_step"] == final["global_step"] == 4


def test_resume_refuses_a_checkpoint_of_another_model(tiny_config, fp32_run,
                                                      tmp_path: Path) -> None:
    from q8.lit import UsageError

    run_dir = tmp_path / "run"
    fp32_run(run_dir)
    with pytest.raises(UsageError, match="incompatible.*small_input"):
        train(
            tiny_config("quant=fp32", "model.small_input=true", "ckpt_path=last", run_dir=run_dir)
        )


def test_an_unreadable_last_ckpt_falls_back_to_the_newest_readable_one(
        tiny_config, fp32_run, tmp_path: Path, capsys) -> None:
    """ckpt_path=last with a damaged last.ckpt: a warning naming it, and the resume starts from
    the run's newest checkpoint that can be read (here the best one)."""
    run_dir = tmp_path / "run"
    fp32_run(run_dir, *TWO_EPOCHS)
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    saved_step = torch.load(best, map_location="cpu", weights_only=False)["global_step"]
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    resumed = train(tiny_config("quant=fp32", "ckpt_path=last", "trainer.max_epochs=3",
                                run_dir=run_dir))
    warning = capsys.readouterr().err
    assert "warning: cannot read checkpoint ckpt_path=" in warning and "last.ckpt" in warning
    assert f"resuming from {best} instead" in warning
    assert resumed["start_step"] == saved_step and resumed["global_step"] == 6


def test_no_readable_checkpoint_is_one_clear_error(tiny_config, fp32_run, tmp_path: Path) -> None:
    from q8.lit import UsageError

    run_dir = tmp_path / "run"
    fp32_run(run_dir)
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"")
    with pytest.raises(UsageError, match=r"cannot read checkpoint ckpt_path=.*last\.ckpt"):
        train(tiny_config("quant=fp32", "ckpt_path=last", run_dir=run_dir))
    other = run_dir / "checkpoints" / "other.ckpt"  # a file named explicitly does not fall back
    other.write_bytes(b"x")
    with pytest.raises(UsageError, match="cannot read checkpoint"):
        train(tiny_config("quant=fp32", f"ckpt_path={other}", run_dir=run_dir))


def test_a_checkpoint_write_that_fails_stops_the_run_and_keeps_the_previous(
        fp32_run, tmp_path: Path) -> None:
    """The second run may write no file larger than half a checkpoint (RLIMIT_FSIZE, as a full
    disk or a quota would stop it): its first checkpoint write fails, the run exits with code 2
    and one line naming the file, and last.ckpt of the first run is intact."""
    import resource
    import signal

    run_dir = tmp_path / "run"
    fp32_run(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    limit = len(before) // 2

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(
        [sys.executable, "train.py", *TINY, *TINY_DIGITS, "quant=fp32", "ckpt_path=last",
         "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write checkpoint {run_dir / 'checkpoints'}/"), line
    assert line.endswith("File too large") or line.endswith("the previous one is intact"), line
    assert last.read_bytes() == before
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


def test_missing_dataset_is_one_clear_error(tiny_config, tmp_path: Path) -> None:
    from q8.lit import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match=r"looked for .*nowhere.*data.download=true"):
        train(tiny_config("data=cifar10", f"data.root={tmp_path / 'nowhere'}"))


def test_wandb_runs_offline_without_credentials(tiny_config, tmp_path: Path, monkeypatch) -> None:
    import wandb

    import train as train_module

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores the variable afterwards
        monkeypatch.delenv(var)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    seen: list[dict] = []  # the W&B run as train.py closes it (its summary is gone afterwards)
    finish = wandb.Run.finish

    def look_and_finish(run, *args, **kwargs):
        seen.append({"name": run.name, "group": run.group, "tags": set(run.tags),
                     "config": dict(run.config), "summary": dict(run.summary)})
        return finish(run, *args, **kwargs)

    monkeypatch.setattr(wandb.Run, "finish", look_and_finish)
    losses: dict[int, float] = {}  # train/loss_step as Lightning hands it to the loggers
    monkeypatch.setattr(train_module, "instantiate_loggers", _recording_loggers(
        train_module.instantiate_loggers, losses))
    run_dir = tmp_path / "run"
    metrics = train(tiny_config("quant=fp32", "logger=wandb", run_dir=run_dir))
    assert os.environ["WANDB_MODE"] == "offline"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    (run,) = seen
    assert run["name"] == "resnet18-fp32-s0" and run["group"] == "default"
    assert {"resnet18", "fp32", "digits"} <= run["tags"]
    assert run["config"]["model"]["name"] == "resnet18"
    assert run["config"]["quant"]["grad_bits"] is None  # the resolved fp32 preset
    assert run["summary"]["final/test/acc"] == pytest.approx(metrics["test/acc"])
    # the per-layer scalars are in the history, not in the summary (W&B's table and printout)
    assert not [k for k in run["summary"] if k.split("/")[0] in ("quant", "grads")]
    assert "val/acc" in run["summary"]
    # the CSV log beside W&B: the resolved config, and every step's loss as it was logged
    assert read_hparams(run_dir)["quant"]["grad_bits"] is None
    history = read_history(run_dir)
    assert sorted(losses) == [0, 1]  # TINY: 2 training batches, one logging step each
    assert dict(values(history, "train/loss_step")) == losses
    assert values(history, "test/acc").iloc[-1] == metrics["test/acc"]
    assert [k for k in history if k.startswith("grads/conv1/")]


def _recording_loggers(instantiate_loggers, losses: dict[int, float]):
    """instantiate_loggers, with the CSV logger's log_metrics recording train/loss_step by step."""
    def create(node):
        loggers = instantiate_loggers(node)
        from lightning.pytorch.loggers import CSVLogger

        (csv_logger,) = [lg for lg in loggers if isinstance(lg, CSVLogger)]
        log_metrics = csv_logger.log_metrics

        def record(metrics, step=None):
            if "train/loss_step" in metrics:
                losses[step] = float(metrics["train/loss_step"])
            return log_metrics(metrics, step)

        csv_logger.log_metrics = record
        return loggers

    return create


def _run_cli(*overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant=nope", r"unknown quant 'nope': valid choices are .*q8_bifurcated"),
        ("quant.grad_bits=0", r"grad_bits=0 is invalid.*2\.\.16"),
        ("model.name=resnt18", r"'resnt18' is not a timm model; did you mean .*resnet18"),
        pytest.param("data.batch_size=0",
                     r"data\.batch_size=0 is invalid: it must be an integer >= 1",
                     marks=pytest.mark.slow),
        pytest.param("test_weights=last",
                     r"test_weights='last' is invalid: valid choices are best, final",
                     marks=pytest.mark.slow),
        pytest.param("quant.backend=gpu",
                     r"backend='gpu' is invalid: valid choices are auto, reference, cpu",
                     marks=pytest.mark.slow),
    ],
)
def test_bad_override_fails_fast_with_one_line(override: str, message: str) -> None:
    result = _run_cli(override, "hydra.run.dir=/tmp/q8-never-created")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]


def test_each_log_line_appears_once(tmp_path: Path) -> None:
    """Lightning's messages and its model summary reach the console once (and train.log once),
    not once through Lightning's own handler and again through Hydra's."""
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if "enable_model_summary" not in o]
    result = _run_cli(*tiny, *TINY_DIGITS, "quant=fp32", "callbacks=none", "test=false",
                      f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    for line in ("GPU available:", "Trainable params"):
        assert console.count(line) == 1, (line, console[-3000:])
        assert (run_dir / "train.log").read_text().count(line) == 1, line


def test_a_run_directory_that_cannot_be_created_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    result = _run_cli(f"hydra.run.dir={blocker / 'run'}")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: cannot use {blocker / 'run'}: Not a directory"], result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda backend runs here")
def test_an_unavailable_backend_is_one_clear_error() -> None:
    result = _run_cli("quant.backend=cuda", "hydra.run.dir=/tmp/q8-never-created")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: quant.backend=cuda: backend 'cuda' needs a CUDA GPU "
                     "(torch.cuda.is_available() is False); use quant.backend=auto"], lines


def test_a_batch_the_model_cannot_train_on_fails_before_training(tmp_path: Path) -> None:
    """ResNet-18 reduces 32x32 digits to 1x1: a batch of one image leaves its last BatchNorm a
    single value per channel. The model is built and checked, but no data is loaded."""
    import re

    run_dir = tmp_path / "run"
    short = ["trainer.max_steps=2", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    result = _run_cli("data.batch_size=1", "logger=csv", *short, f"hydra.run.dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert re.search(r"data\.batch_size=1 is too small: BatchNorm layer layer4\.0\.bn1 .*"
                     r"use data\.batch_size >= 2", errors[0]), errors[0]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "csv").exists()


def test_multirun_sweep(tmp_path: Path) -> None:
    result = _run_cli("-m", "quant=fp32", "seed=1,2", *TINY, *TINY_DIGITS, "callbacks=none",
                      f"paths.log_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(tmp_path.glob("multiruns/*/*/metrics.json"))) == 2


def test_lr_schedule_warms_up_then_decays() -> None:
    from q8.lit.optim import lr_factor

    cosine = {"name": "cosine", "warmup_epochs": 1, "warmup_start": 0.1}
    assert lr_factor(0, 100, 10, **cosine) == pytest.approx(0.1)
    assert lr_factor(10, 100, 10, **cosine) == pytest.approx(1.0)  # end of warm-up
    assert lr_factor(55, 100, 10, **cosine) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(100, 100, 10, **cosine) == pytest.approx(0.0)
    step = {"name": "step", "warmup_epochs": 5, "milestones": [30, 60, 80], "gamma": 0.1}
    assert [lr_factor(e * 10, 900, 10, **step) for e in (29, 30, 60, 85)] == pytest.approx(
        [1.0, 0.1, 0.01, 0.001]
    )


@pytest.mark.parametrize("group", ["model", "optimizer", "scheduler"])
def test_every_object_is_built_from_its_target(group: str) -> None:
    """As data, trainer, callbacks and logger: each config of the group names what it builds."""
    for path in (CONF_DIR / group).glob("*.yaml"):
        assert "_target_" in yaml.safe_load(path.read_text()), path


def test_the_optimizer_and_scheduler_configs_build_the_papers_recipe() -> None:
    """SGD 0.9, weight decay 1e-4, lr 0.1 warmed up over 5 epochs from 0.01, x0.1 at 30/60/80."""
    from q8.lit.instantiate import instantiate

    cfg = compose_config(["experiment=imagenet_resnet18"])
    optimizer = instantiate(cfg.optimizer, "optimizer")([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD)
    assert (optimizer.defaults["momentum"], optimizer.defaults["weight_decay"]) == (0.9, 1e-4)
    scheduler = instantiate(cfg.scheduler, "scheduler")(optimizer, total_steps=900,
                                                        steps_per_epoch=10)
    lrs = []
    for _ in range(900):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [lrs[s] for s in (0, 25, 50, 299, 300, 600, 850)] == pytest.approx(
        [0.01, 0.055, 0.1, 0.1, 0.01, 0.001, 0.0001])


def test_optimizer_settings_it_does_not_take_are_one_clear_error(tiny_config) -> None:
    import functools

    from q8.lit import UsageError, create_classifier
    from q8.lit.instantiate import instantiate
    from q8.lit.optim import warmup_constant

    with pytest.raises(UsageError, match=r"cannot build optimizer: torch\.optim\.SGD: .*momentun"):
        instantiate(tiny_config("+optimizer.momentun=0.9").optimizer, "optimizer")
    module = create_classifier("test_resnet", 10, 1, optimizer=functools.partial(
        torch.optim.SGD, lr=-1.0), scheduler=warmup_constant)
    with pytest.raises(UsageError, match=r"the optimizer rejects its settings .*lr"):
        module.configure_optimizers()


def test_digits_split_is_stratified_and_fixed_by_split_seed() -> None:
    from q8.lit.data import DigitsDataModule

    def labels(**kwargs: int) -> list:
        dm = DigitsDataModule(**kwargs)
        dm.setup()
        return dm.test_set.tensors[1].tolist()

    a, b = labels(split_seed=0), labels(split_seed=0)
    assert a == b and len(a) == 360
    assert labels(split_seed=1) != a
    counts = [a.count(c) for c in range(10)]
    assert max(counts) - min(counts) <= 2  # stratified: 36 +- 1 per class


def test_small_input_stem_keeps_the_resolution() -> None:
    import torch

    from q8.lit.models import create_backbone

    model = create_backbone("resnet18", num_classes=10, in_chans=1, small_input=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    features = model.forward_features(torch.zeros(2, 1, 32, 32))
    assert features.shape[-2:] == (4, 4)  # 32 / 8: no stride in the stem, three stages of 2


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fp32", "q8_bifurcated"])
def test_default_run_is_trained(preset: str, tmp_path: Path) -> None:
    """`make train` as it is (but for the logger): digits test accuracy above 95%."""
    run_dir = tmp_path / "run"
    cfg = compose_config([f"quant={preset}", "logger=csv"], output_dir=run_dir)
    metrics = train(cfg)
    assert metrics["epochs"] == cfg.trainer.max_epochs
    assert metrics["test/acc"] > 0.95, metrics
