"""A local run's logged history, as Lightning's CSVLogger writes it beside W&B.

`<run dir>/csv/metrics.csv` (conf/logger/csv.yaml; `logger=wandb` writes it too) has one row
per logging call: a `step` column (the trainer's global step), an `epoch` column for the
trainer's own logging calls, and one column per key ever logged, empty where that call did not
log the key. Keys are flat: `train/loss_step`, `val/acc`, `quant/<layer>/grad_sqnr_db`,
`grads/<layer>/wgrad_norm`. `hparams.yaml` beside it holds the logged hyperparameters: the
resolved config (train.py) and `q8_stats_layers`, the measured layers in network order
(QuantStatsCallback). W&B histograms (`hist/...`) are W&B's only.

    from q8.lit.run_history import read_history, read_hparams, values
    history = read_history("outputs/runs/<run>")
    values(history, "train/loss_step")      # a Series: step -> loss
    read_hparams("outputs/runs/<run>")["quant"]["grad_bits"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"


def metrics_file(path: str | Path) -> Path | None:
    """The metrics.csv of a run directory (`csv/metrics.csv`), of a CSVLogger directory, or
    `path` itself; None where there is none."""
    path = Path(path)
    if path.is_file():
        return path if path.name == METRICS_FILE else None
    return next((p for p in (path / "csv" / METRICS_FILE, path / METRICS_FILE) if p.is_file()),
                None)


def read_history(path: str | Path) -> pd.DataFrame:
    """Every logged row of a run (see the module's docstring), in logging order; NaN where a
    row did not log a key. Raises FileNotFoundError when the run has no metrics.csv."""
    file = metrics_file(path)
    if file is None:
        raise FileNotFoundError(f"no {METRICS_FILE} in {path} (nor in {Path(path) / 'csv'}): "
                                "was the run logged with logger=wandb or logger=csv?")
    return pd.read_csv(file, float_precision="round_trip")  # floats exactly as logged


def read_hparams(path: str | Path) -> dict[str, Any]:
    """The hyperparameters logged beside a run's metrics.csv ({} when there are none)."""
    import yaml

    file = metrics_file(path)
    hparams = file.with_name(HPARAMS_FILE) if file else None
    if hparams is None or not hparams.is_file():
        return {}
    return yaml.safe_load(hparams.read_text()) or {}


def values(history: pd.DataFrame, key: str) -> pd.Series:
    """The logged values of `key`, indexed by step (only the rows that logged it)."""
    if key not in history:
        return pd.Series(dtype=float, name=key)
    rows = history.dropna(subset=[key])
    return pd.Series(rows[key].to_numpy(dtype=float), index=rows["step"].to_numpy(dtype=int),
                     name=key)
