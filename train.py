"""Train a timm model with q8's 8-bit training, configured by Hydra (conf/train.yaml).

    python train.py                                   # ResNet-18, q8_bifurcated, digits
    python train.py model=resnet50 quant=fp32 data=cifar10 trainer=gpu
    python train.py -m quant=fp32,q8_bifurcated seed=1,2,3

Configuration mistakes (unknown preset, invalid bits, missing data) exit with code 2 and one
line on stderr; `verbose=true` or HYDRA_FULL_ERROR=1 shows the traceback instead.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from q8.lit import launch
from q8.lit.errors import StoppedBySignal, UsageError
from q8.lit.instantiate import (
    build_quant_config,
    instantiate,
    instantiate_group,
    instantiate_loggers,
    instantiate_model,
    one_line,
)
from q8.lit.loggers import finish_loggers
from q8.lit.validate import check_run_config

# Lightning, timm and wandb take seconds to import: they are imported once the configuration
# is known to be valid, so that mistakes are reported at once.

def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, write <run dir>/metrics.json; return the metrics."""
    start = time.time()
    # Check what is cheap to check before importing Lightning, loading data or building the
    # model: interpolations and ??? values, the quant preset, sizes, paths.
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    quant = build_quant_config(cfg.quant)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = check_run_config(resolved, quant, output_dir)

    import lightning as L
    import torch

    launch.log_each_line_once()  # now that Lightning added its own console handler

    from q8.lit import distributed
    from q8.lit.resume import resume_from
    from q8.lit.run_history import final_metrics, write_metrics
    from q8.lit.validate import check_model_input

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    datamodule = instantiate(cfg.data, "data")
    L.seed_everything(cfg.seed, workers=True)
    module = instantiate_model(cfg, datamodule)
    if ckpt_path:  # the checkpoint is this run's model and quant preset
        ckpt_path = resume_from(cfg.ckpt_path, ckpt_path, output_dir, module.hparams, quant)
    check_model_input(module.model, datamodule)  # the model takes the data's images

    callbacks = instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(resolved)

    test_weights = cfg.get("test_weights", "best")
    with distributed.stop_started_ranks_on_signal(trainer):
        with distributed.exit_when_fit_stops(trainer, output_dir):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        tested = best if test_weights == "best" else ""  # "": the final weights
        test_metrics: dict[str, float] = {}
        if cfg.get("test", True):
            results = trainer.test(module, datamodule=datamodule, ckpt_path=tested or None)
            test_metrics = {k: float(v) for k, v in results[0].items()} if results else {}

    metrics = final_metrics(
        trainer, fit_metrics, test_metrics,
        start_step=module.start_step,
        wall_time_s=round(time.time() - start, 2),
        quant=cfg.get("quant_name"),
        quant_label=quant.short_str(),
        quant_config=quant.to_dict(),
        model=cfg.model.name,
        data=_choice("data"),
        experiment=cfg.get("experiment_name"),
        seed=cfg.seed,
        tested_checkpoint=(tested or "final weights") if cfg.get("test", True) else None,
        run_dir=str(output_dir),
    )
    if trainer.is_global_zero:
        print(f"metrics written to {write_metrics(output_dir, metrics)}")
    finish_loggers(loggers, metrics)
    return metrics


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
