"""Train a timm model with q8's 8-bit training, configured by Hydra (conf/train.yaml).

    python train.py                                   # ResNet-18, q8_bifurcated, digits
    python train.py model=resnet50 quant=fp32 data=cifar10 trainer=gpu
    python train.py -m quant=fp32,q8_bifurcated seed=1,2,3

Configuration mistakes (unknown preset, invalid bits, missing data) exit with code 2 and one
line on stderr; `verbose=true` or HYDRA_FULL_ERROR=1 shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from q8.config import QuantConfig
from q8.lit import launch
from q8.lit.errors import StoppedBySignal, UsageError
from q8.lit.validate import check_backend, check_ckpt_path, check_data_config

# Lightning, timm and wandb take seconds to import: they are imported once the configuration
# is known to be valid, so that mistakes are reported at once.

log = logging.getLogger("train")


def build_quant_config(node: DictConfig) -> QuantConfig:
    try:
        return QuantConfig.from_dict(OmegaConf.to_container(node, resolve=True))
    except ValueError as ex:
        raise UsageError(f"quant: {ex}") from ex


def instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with errors turned into one-line UsageErrors."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as ex:
        if isinstance(ex.__cause__, UsageError):
            raise ex.__cause__ from None
        cause = ex.__cause__ or ex
        raise UsageError(f"cannot build {what}: {type(cause).__name__}: {cause}") from ex


def instantiate_group(node: DictConfig | None, what: str) -> list[Any]:
    """Every `_target_` entry of a group such as `callbacks` or `logger`."""
    if not node:
        return []
    return [
        instantiate(sub, f"{what}.{key}")
        for key, sub in node.items()
        if isinstance(sub, DictConfig) and "_target_" in sub
    ]


def create_loggers(node: DictConfig | None) -> list[Any]:
    from q8.lit.wandb_mode import choose_wandb_mode, fall_back_to_offline

    uses_wandb = node and any("Wandb" in str(sub.get("_target_", "")) for sub in node.values())
    if not uses_wandb:
        return instantiate_group(node, "logger")
    choose_wandb_mode()
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    loggers = instantiate_group(node, "logger")
    try:
        for logger in loggers:
            logger.experiment  # noqa: B018  (starts the W&B run now, not mid-training)
    except Exception as ex:  # wandb raises many types; none of them should stop training
        if os.environ.get("WANDB_MODE") == "offline":
            raise
        fall_back_to_offline(ex)
        loggers = instantiate_group(node, "logger")
    return loggers


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write <run dir>/metrics.json; return the metrics."""
    start = time.time()
    # Validate everything that is cheap to check before importing Lightning, loading data or
    # building the model: interpolations and ??? values, the quant preset, paths.
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    quant = build_quant_config(cfg.quant)
    check_data_config(resolved["data"])  # sizes in range, before Lightning is imported
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = check_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if cfg.get("test_weights", "best") not in ("best", "final"):
        raise UsageError(
            f"test_weights={cfg.test_weights!r} is invalid: valid choices are best, final"
        )
    check_backend(quant)

    import lightning as L
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    launch.log_each_line_once()  # now that Lightning added its own console handler

    from q8.lit import ClassifierModule, check_model_name, distributed
    from q8.lit.callbacks.nan_guard import NonFiniteError
    from q8.lit.resume import check_checkpoint_matches, read_resume_checkpoint
    from q8.lit.validate import check_model_input

    check_model_name(cfg.model.name)
    datamodule = instantiate(cfg.data, "data")
    model_args: dict[str, Any] = {
        "model_name": cfg.model.name,
        "num_classes": datamodule.num_classes,
        "in_chans": datamodule.in_chans,
        "small_input": cfg.model.small_input,
    }
    if ckpt_path:
        ckpt_path, ckpt = read_resume_checkpoint(cfg.ckpt_path, ckpt_path, output_dir)
        check_checkpoint_matches(ckpt_path, ckpt, model_args, quant)
        del ckpt

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    L.seed_everything(cfg.seed, workers=True)
    module = ClassifierModule(
        **model_args,
        model_kwargs=resolved["model"]["kwargs"],
        optimizer=resolved["optimizer"],
        scheduler=resolved["scheduler"],
    )
    check_model_input(module.model, datamodule)  # the model takes the data's images

    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = create_loggers(cfg.get("logger"))
    plugins = [instantiate(p, "trainer.plugins") for p in cfg.trainer.get("plugins") or []]
    trainer = instantiate(
        cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
        plugins=plugins or None,
    )
    for logger in loggers:
        logger.log_hyperparams(resolved)

    with distributed.stop_started_ranks_on_signal(trainer):
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        except SIGTERMException:
            # ResumableCheckpoint saved last.ckpt; 128 + SIGTERM, as a shell reports a kill
            print(f"stopped by a signal; resume with ckpt_path=last hydra.run.dir={output_dir}")
            sys.exit(143)
        except NonFiniteError as ex:  # the NanGuard callback's verdict: one line, no traceback
            print(f"error: {ex}", file=sys.stderr)
            sys.exit(1)
        except RuntimeError as ex:  # a rank died or hangs: name it, stop the others
            message = distributed.lost_rank_message(trainer, ex)
            if message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
        tested = best if cfg.get("test_weights", "best") == "best" else ""  # "": the final weights
        test_metrics: dict[str, float] = {}
        if cfg.get("test", True):
            results = trainer.test(module, datamodule=datamodule, ckpt_path=tested or None)
            test_metrics = {k: float(v) for k, v in results[0].items()} if results else {}

    def pick(name: str) -> float | None:
        return fit_metrics.get(f"{name}_epoch", fit_metrics.get(name))

    metrics: dict[str, Any] = {
        "train/loss": pick("train/loss"),
        "train/acc": pick("train/acc"),
        "val/loss": pick("val/loss"),
        "val/acc": pick("val/acc"),
        "val/acc_best": float(checkpoint.best_model_score)
        if checkpoint is not None and checkpoint.best_model_score is not None
        else None,
        "test/loss": test_metrics.get("test/loss"),
        "test/acc": test_metrics.get("test/acc"),
        "accuracy_unit": "fraction",
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "start_step": module.start_step,
        "wall_time_s": round(time.time() - start, 2),
        "quant": cfg.get("quant_name"),
        "quant_label": quant.short_str(),
        "quant_config": {**quant.to_dict(), "skip": list(quant.skip)},
        "model": cfg.model.name,
        "data": _choice("data"),
        "experiment": cfg.get("experiment_name"),
        "seed": cfg.seed,
        "tested_checkpoint": (tested or "final weights") if cfg.get("test", True) else None,
        "run_dir": str(output_dir),
    }
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / "metrics.json"
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"metrics written to {path}")
    finish_loggers(loggers, metrics)
    return metrics


def finish_loggers(loggers: list[Any], metrics: dict[str, Any]) -> None:
    """Put the final metrics in each W&B run's summary and close the run (its files complete)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            logger.experiment.summary.update({f"final/{k}": v for k, v in summary.items()})
            logger.experiment.finish()


def _choice(group: str) -> str | None:
    return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None


_VERBOSE = False  # set by cli(): show tracebacks of configuration errors


def exit_with(ex: BaseException) -> None:
    print(f"error: {one_line(ex)}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    launch.close_log_files_off_rank_zero()  # a rank > 0 writes nothing into the run dir
    try:
        return train(cfg).get("test/acc")  # the value a Hydra sweeper maximises
    except (UsageError, OmegaConfBaseException) as ex:
        if _VERBOSE or cfg.get("verbose"):
            raise
        exit_with(ex)  # here, not in cli(): Hydra would first print the job's overrides


def one_line(ex: BaseException) -> str:
    """A configuration error as one line, naming the key or value and the valid choices."""
    if isinstance(ex, MissingConfigException) and ex.missing_cfg_file and ex.options:
        group, _, name = ex.missing_cfg_file.rpartition("/")
        return f"unknown {group} {name!r}: valid choices are {', '.join(sorted(ex.options))}"
    text = str(ex)
    cause = ex.__cause__
    if isinstance(cause, OmegaConfBaseException) and str(cause).splitlines()[0] not in text:
        text += f": {cause}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    lines = [ln for ln in lines if not re.match(r"(full_key|object_type|Set the environment)", ln)]
    return " ".join(lines)


def cli() -> None:
    """Run main(); configuration errors become one line on stderr and exit code 2."""
    global _VERBOSE
    _VERBOSE = os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        re.fullmatch(r"\+{0,2}verbose=(true|True|1|yes)", a) for a in sys.argv[1:]
    )
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let errors reach us instead of Hydra's exit(1)
    # Under torchrun and srun every rank composes the config: one run dir (Q8_RUN_ID) for all
    sys.argv += launch.launch_overrides(sys.argv[1:])
    for signum in (signal.SIGTERM, signal.SIGUSR1):  # fit replaces them with a saving stop
        signal.signal(signum, StoppedBySignal.raise_on)
    try:
        main()
    except StoppedBySignal as ex:  # outside fit: nothing to save
        name = signal.Signals(ex.signum).name
        print(f"stopped by {name} outside training: this stop saved no checkpoint",
              file=sys.stderr)
        sys.exit(143)
    except (UsageError, HydraException, OmegaConfBaseException) as ex:
        if _VERBOSE:
            raise
        exit_with(ex)
    except OSError as ex:  # a path that cannot be read or written: the run dir, a data file
        if _VERBOSE or not ex.filename:
            raise
        print(f"error: cannot use {ex.filename}: {ex.strerror or ex}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
