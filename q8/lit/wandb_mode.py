"""W&B that is safe by default: offline unless credentials exist, never waiting on a network."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

log = logging.getLogger(__name__)


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
