"""Checks that a run can work, made before training so that a mistake costs seconds, not a crash
in the first step: each raises a UsageError naming the key, its value and the valid range.

- `check_data_config(cfg.data)`: sizes in the data config; needs no import of Lightning or torch.
- `check_ckpt_path(cfg.ckpt_path, run dir)`: the checkpoint to resume from exists (q8.lit.resume
  reads and checks it once Lightning is imported).
- `check_backend(quant)`: a kernel backend named explicitly runs on this machine.
- `check_model_input(model, datamodule)`: one eval-mode forward of a single blank image, before
  any data is loaded: the model accepts the data's image size and channels, and no BatchNorm
  layer would see a single value per channel in training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from q8.config import QuantConfig
from q8.lit.errors import UsageError

# data.<key>: the smallest valid value
_DATA_MINIMA = {"batch_size": 1, "eval_batch_size": 1, "image_size": 1, "num_workers": 0,
                "num_samples": 1, "in_chans": 1, "num_classes": 1}  # the last three: synthetic


def check_run_config(cfg: Mapping[str, Any], quant: QuantConfig, output_dir: Path) -> str | None:
    """What can be checked before Lightning is imported, the data loaded or the model built:
    the data sizes, `test_weights`, the kernel backend and the checkpoint to resume from, which
    it returns (a path, or None). `cfg` is the resolved configuration."""
    check_data_config(cfg["data"])
    if cfg.get("test_weights", "best") not in ("best", "final"):
        raise UsageError(
            f"test_weights={cfg['test_weights']!r} is invalid: valid choices are best, final")
    check_backend(quant)
    return check_ckpt_path(cfg.get("ckpt_path"), output_dir)


def check_ckpt_path(path: str | None, output_dir: Path) -> str | None:
    """The checkpoint file to resume from: `last` means <run dir>/checkpoints/last.ckpt; a
    missing file is an error now, not after the slow imports."""
    if path is None:
        return None
    resolved = output_dir / "checkpoints" / "last.ckpt" if path == "last" else Path(path)
    if not resolved.is_file():
        hint = (
            "resume in the old run directory with hydra.run.dir=<that run dir>"
            if path == "last"
            else "pass the path of a .ckpt file"
        )
        raise UsageError(f"ckpt_path={path}: {resolved} does not exist; {hint}")
    return str(resolved)


def check_backend(quant: QuantConfig) -> None:
    """A kernel backend named explicitly must run here (`auto` always does)."""
    from q8.kernels import BackendUnavailable, load

    if quant.backend == "auto":
        return
    try:
        load(quant.backend)
    except BackendUnavailable as ex:
        raise UsageError(f"quant.backend={quant.backend}: {ex}; use quant.backend=auto") from ex


def check_data_config(data: Mapping[str, Any]) -> None:
    """Every size in the data config (batch_size, eval_batch_size, image_size, num_workers;
    synthetic data's num_samples, in_chans, num_classes) is an integer in its valid range; keys
    a data set does not have are not checked."""
    for key, low in _DATA_MINIMA.items():
        if key not in data or (key == "eval_batch_size" and data[key] is None):
            continue  # not this data set's key, or eval_batch_size = batch_size
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"data.{key}={value!r} is invalid: it must be an integer >= {low}")


def check_model_input(model: Any, datamodule: Any) -> None:
    """Run `model` once on a blank image of the datamodule's `in_chans` x `image_size`^2 (eval
    mode, no gradient, RNG and buffers untouched): a shape the model cannot take is reported,
    and so is a BatchNorm whose training batch would hold one value per channel (PyTorch's
    BatchNorm raises, q8's normalises every value to 0). Data modules without an `image_size`
    are not checked."""
    import torch
    from torch import nn

    import q8

    size = getattr(datamodule, "image_size", None)
    chans = getattr(datamodule, "in_chans", None)
    batch = getattr(datamodule, "batch_size", None)
    if not (isinstance(size, int) and isinstance(chans, int) and isinstance(batch, int)):
        return
    norms: dict[str, tuple[int, ...]] = {}

    def record(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple) -> None:
            norms.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [
        m.register_forward_pre_hook(record(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    was_training = model.training
    try:  # the reference kernels: a run on a GPU builds no CPU kernels for this check
        with torch.random.fork_rng(devices=[]), torch.no_grad(), q8.use_backend(model,
                                                                                "reference"):
            model.eval()
            model(torch.zeros(1, chans, size, size))
    except Exception as ex:  # timm's models raise many types for a shape they cannot take
        reason = str(ex).splitlines()[0][:200] if str(ex) else type(ex).__name__
        raise UsageError(
            f"the model cannot take the data's images (data.image_size={size}, {chans} "
            f"channels): {type(ex).__name__}: {reason}; use an image size the model accepts"
        ) from ex
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    for name, shape in norms.items():
        per_image = math.prod(shape[2:])  # values per channel of one image at this layer
        if batch * per_image < 2:
            raise UsageError(
                f"data.batch_size={batch} is too small: BatchNorm layer {name} would normalise "
                f"a single value per channel in training ({batch} image(s) x a "
                f"{'x'.join(map(str, shape[2:])) or '1'} feature map at "
                f"data.image_size={size}); use data.batch_size >= {math.ceil(2 / per_image)}"
            )
