"""What a local run leaves: `metrics.json`, its final metrics (written by train.py with
`final_metrics` and `write_metrics`), and its logged history, as Lightning's CSVLogger writes it
beside W&B.

Each launch of a run writes `<run dir>/csv/version_<n>/metrics.csv` (conf/logger/csv.yaml;
`logger=wandb` writes it too): a run resumed twice has three, and its history is theirs joined,
each launch's rows replacing those of the launches before it from its first step on (a resumed
launch trains again the steps after its checkpoint). Each metrics.csv has one row per logging
call: a `step` column (the trainer's global step), an `epoch` column for the
trainer's own logging calls, and one column per key ever logged, empty where that call did not
log the key. Keys are flat: `train/loss_step`, `val/acc`, `quant/<layer>/grad_sqnr_db`,
`grads/<layer>/wgrad_norm`. `hparams.yaml` beside it holds the logged hyperparameters: the
resolved config (train.py) and `q8_stats_layers`, the measured layers in network order
(QuantStatsCallback); the last launch's are the run's. W&B histograms (`hist/...`) are W&B's only.

    from q8.lit.run_history import read_history, read_hparams, values
    history = read_history("outputs/runs/<run>")
    values(history, "train/loss_step")      # a Series: step -> loss
    read_hparams("outputs/runs/<run>")["quant"]["grad_bits"]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

METRICS_FILE = "metrics.csv"
HPARAMS_FILE = "hparams.yaml"
RESULT_FILE = "metrics.json"


def final_metrics(trainer: Any, fit: Mapping[str, float], test: Mapping[str, float],
                  **about: Any) -> dict[str, Any]:
    """metrics.json's contents: the last train and val metrics of fit (`fit`, the trainer's
    callback_metrics after fit), the best val accuracy, the test metrics, the first step's GEMM
    coverage (coverage/*), where training stopped, then `about` (the run's quant, model, data,
    seed, ...). Accuracies are fractions."""
    def last(name: str) -> float | None:
        value = fit.get(f"{name}_epoch", fit.get(name))
        return None if value is None else float(value)

    best = getattr(trainer.checkpoint_callback, "best_model_score", None)
    return {
        **{key: last(key) for key in ("train/loss", "train/acc", "val/loss", "val/acc")},
        "val/acc_best": None if best is None else float(best),
        **{key: (float(test[key]) if key in test else None) for key in ("test/loss", "test/acc")},
        "accuracy_unit": "fraction",
        **{key: float(value) for key, value in fit.items() if key.startswith("coverage/")},
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        **about,
    }


def write_metrics(run_dir: Path, metrics: Mapping[str, Any]) -> Path:
    """Write `<run_dir>/metrics.json` and return its path."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESULT_FILE
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def metrics_files(path: str | Path) -> list[Path]:
    """The metrics.csv files of a run directory, oldest launch first (`csv/version_<n>/`, and
    `csv/metrics.csv` of a log without versions), of a CSVLogger directory, or `path` itself."""
    path = Path(path)
    if path.is_file():
        return [path] if path.name == METRICS_FILE else []
    for logs in (path / "csv", path):
        versions = sorted((int(d.name.removeprefix("version_")), d / METRICS_FILE)
                          for d in logs.glob("version_*")
                          if d.name.removeprefix("version_").isdigit()
                          and (d / METRICS_FILE).is_file())
        files = [f for _, f in versions]
        if (logs / METRICS_FILE).is_file():
            files.insert(0, logs / METRICS_FILE)
        if files:
            return files
    return []


def read_history(path: str | Path) -> pd.DataFrame:
    """Every logged row of a run (see the module's docstring), in logging order; NaN where a
    row did not log a key. Raises FileNotFoundError when the run has no metrics.csv."""
    files = metrics_files(path)
    if not files:
        raise FileNotFoundError(f"no {METRICS_FILE} in {path} (nor in {Path(path) / 'csv'}): "
                                "was the run logged with logger=wandb or logger=csv?")
    launches = [pd.read_csv(f, float_precision="round_trip") for f in files]  # floats as logged
    kept = []
    for i, rows in enumerate(launches):
        later = [r["step"].min() for r in launches[i + 1:] if len(r)]
        kept.append(rows[rows["step"] < min(later)] if later else rows)
    return pd.concat(kept, ignore_index=True) if len(kept) > 1 else kept[0]


def read_hparams(path: str | Path) -> dict[str, Any]:
    """The hyperparameters logged beside a run's last metrics.csv ({} when there are none)."""
    import yaml

    files = metrics_files(path)
    hparams = files[-1].with_name(HPARAMS_FILE) if files else None
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
