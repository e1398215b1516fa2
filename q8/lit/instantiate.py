"""Turning the Hydra configuration into objects, with mistakes reported as one line: the one
module of q8.lit that uses Hydra.

train.py composes the configuration and builds the run from it with these: every object that has
a `_target_` in conf/ (data, model, optimizer, scheduler, trainer, callbacks, loggers, plugins)
goes through `instantiate`, so that a bad value becomes a UsageError naming what could not be
built, and `one_line` is what the user sees of it (exit code 2, no traceback).
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any

import hydra
from hydra.errors import InstantiationException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from q8.config import QuantConfig
from q8.lit.errors import UsageError
from q8.lit.loggers import start_wandb


def build_quant_config(node: DictConfig) -> QuantConfig:
    """The `quant` group as a QuantConfig; an invalid field is a UsageError."""
    try:
        return QuantConfig.from_dict(OmegaConf.to_container(node, resolve=True))
    except ValueError as ex:
        raise UsageError(f"quant: {ex}") from ex


def instantiate(node: DictConfig, what: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with errors turned into one-line UsageErrors naming `what`; a
    `_partial_` target is checked to take the keywords it was given, before it is called."""
    try:
        built = hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as ex:
        if isinstance(ex.__cause__, UsageError):
            raise ex.__cause__ from None
        cause = ex.__cause__ or ex
        raise UsageError(f"cannot build {what}: {type(cause).__name__}: {cause}") from ex
    if isinstance(built, functools.partial):
        try:
            inspect.signature(built.func).bind_partial(*built.args, **built.keywords)
        except TypeError as ex:
            raise UsageError(f"cannot build {what}: {node.get('_target_')}: {ex}") from ex
    return built


def instantiate_model(cfg: DictConfig, datamodule: Any) -> Any:
    """The LightningModule of `cfg.model` for the datamodule's classes and channels, given the
    optimizer and scheduler factories of `cfg.optimizer` and `cfg.scheduler` (`_partial_`).
    Lists and dicts arrive as plain Python: the module's checkpoints hold them."""
    return instantiate(
        cfg.model, "model", _convert_="all",
        num_classes=datamodule.num_classes,
        in_chans=datamodule.in_chans,
        optimizer=instantiate(cfg.optimizer, "optimizer", _convert_="all"),
        scheduler=instantiate(cfg.scheduler, "scheduler", _convert_="all"),
        compile=bool(cfg.get("compile", False)),
    )


def instantiate_group(node: DictConfig | None, what: str) -> list[Any]:
    """Every `_target_` entry of a group such as `callbacks` or `logger`."""
    if not node:
        return []
    return [
        instantiate(sub, f"{what}.{key}")
        for key, sub in node.items()
        if isinstance(sub, DictConfig) and "_target_" in sub
    ]


def instantiate_loggers(node: DictConfig | None) -> list[Any]:
    """Every logger of the `logger` group; with W&B among them, its run started here, offline
    without credentials (q8.lit.loggers.start_wandb)."""
    build = functools.partial(instantiate_group, node, "logger")
    if node and any("Wandb" in str(sub.get("_target_", "")) for sub in node.values()):
        return start_wandb(build)
    return build()


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
