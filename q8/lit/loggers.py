"""The run's loggers with W&B safe by default: offline unless credentials exist, never waiting
on a network, falling back to offline if it cannot start. q8.lit.instantiate builds them from
conf/logger/ and calls `start_wandb`."""

from __future__ import annotations

import logging
import netrc
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)


def start_wandb(build: Callable[[], list[Any]]) -> list[Any]:
    """The loggers `build` makes, with W&B's run started here, not mid-training: offline without
    credentials; built again, offline, if the online run cannot start."""
    choose_wandb_mode()
    os.environ.setdefault("WANDB_INIT_TIMEOUT", "60")
    loggers = build()
    try:
        for logger in loggers:
            logger.experiment  # noqa: B018  (starts the W&B run)
    except Exception as ex:  # wandb raises many types; none of them should stop training
        if os.environ.get("WANDB_MODE") == "offline":
            raise
        fall_back_to_offline(ex)
        loggers = build()
    return loggers


def finish_loggers(loggers: list[Any], metrics: Mapping[str, Any]) -> None:
    """Put the final metrics in each W&B run's summary (`final/<key>`) and close the run."""
    from lightning.pytorch.loggers import WandbLogger

    from q8.lit.lightning_internals import wandb_run_started

    for logger in loggers:
        if isinstance(logger, WandbLogger) and wandb_run_started(logger):
            summary = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
            logger.experiment.summary.update({f"final/{k}": v for k, v in summary.items()})
            logger.experiment.finish()


def wandb_has_credentials() -> bool:
    """True if an API key is in the environment or in the netrc file `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_wandb_mode() -> str:
    """Respect WANDB_MODE if set; otherwise go offline when there are no credentials.

    Offline runs write their files under the logger's save_dir; `wandb sync <dir>` uploads them.
    """
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
        log.info("W&B: no API key found (WANDB_API_KEY or `wandb login`): logging offline")
        return "offline"
    return "online"


def fall_back_to_offline(reason: BaseException) -> None:
    """Called when an online W&B run cannot start: warn and continue offline."""
    import wandb

    log.warning("W&B could not start online (%s); continuing offline: sync the run later", reason)
    os.environ["WANDB_MODE"] = "offline"
    wandb.teardown()  # wandb keeps the failed settings in a process-wide singleton otherwise
