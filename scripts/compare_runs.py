"""Compare q8 runs: final metrics by quant preset (mean and spread over seeds), and the figures.

    python scripts/compare_runs.py outputs/                 # every run directory under outputs/
    python scripts/compare_runs.py RUN_DIR RUN_DIR ... --out compare/
    python scripts/compare_runs.py ENTITY/PROJECT --filters '{"group": "cifar10_resnet18"}'
    python scripts/compare_runs.py ENTITY/PROJECT/RUN_ID ...   # online (needs a W&B API key)

A local run is a Hydra run directory: metrics.json (the final metrics) and the history that
Lightning's CSVLogger writes beside W&B, csv/version_<n>/ for each launch (read by
q8.lit.run_history, without a network). An online run is read with W&B's public API. Writes to
--out: summary.csv, layers.csv, curves.png (accuracy and loss by preset) and layers.png
(per-layer quantization error and gradient norms by preset).

scripts/dashboard.py imports load_local and layer_names from here; q8 is the installed package
(make setup: pip install -e .).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# ---------------------------------------------------------------- runs


@dataclass
class Run:
    """One run's identity, configuration, final metrics and logged history."""

    name: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    history: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def preset(self) -> str:
        for key in ("quant", "quant_name"):
            value = self.summary.get(key) if key == "quant" else self.config.get(key)
            if isinstance(value, str) and value:
                return value
        quant = self.config.get("quant")
        return str(self.config.get("quant_label") or (quant if isinstance(quant, str) else "?"))

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _history_frame(rows: list[dict[str, float]] | pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    for step in ("trainer/global_step", "step", "_step"):
        if step in frame:
            frame["step"] = frame[step]
            break
    return frame


def load_local(path: Path) -> list[Run]:
    """Every run under `path`: a run directory, or a folder of them."""
    from q8.lit.run_history import metrics_files

    if (path / "metrics.json").is_file() or metrics_files(path):
        return [_run_from_dir(path)]
    runs: list[Run] = []
    for child in sorted(p for p in path.iterdir() if p.is_dir() and p.name != "wandb"):
        runs += load_local(child)
    return runs


def _run_from_dir(path: Path) -> Run:
    from q8.lit.run_history import metrics_files, read_history, read_hparams

    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    run = Run(path.name, str(path), read_hparams(path), dict(metrics))
    if metrics_files(path):
        run.history = _history_frame(read_history(path))
    if not run.summary and not run.history.empty:  # final values from the CSV's last rows
        last = run.history.ffill().iloc[-1]
        run.summary = {k: float(v) for k, v in last.items() if pd.notna(v)}
    run.config = {**run.config, **{k: metrics[k] for k in ("seed", "model", "experiment")
                                   if k in metrics}}
    if metrics.get("model") and metrics.get("quant"):
        run.name = f"{metrics['model']}-{metrics['quant']}-s{metrics.get('seed')}"
    return run


def load_online(path: str, filters: str | None) -> list[Run]:
    """Runs from W&B: ENTITY/PROJECT (with MongoDB-style `filters`) or ENTITY/PROJECT/RUN_ID."""
    try:
        import wandb

        api = wandb.Api(timeout=30)
        found = [api.run(path)] if path.count("/") == 2 else list(
            api.runs(path, filters=json.loads(filters) if filters else None))
    except Exception as ex:
        raise SystemExit(f"error: cannot read W&B runs {path!r} ({type(ex).__name__}: {ex}); "
                         "offline, pass local run directories instead") from ex
    runs = []
    for r in found:
        rows = [_scalars(row) for row in r.scan_history()]
        summary = _scalars(dict(r.summary))
        config = {k: v for k, v in r.config.items() if not k.startswith("_")}
        runs.append(Run(r.name, r.path and "/".join(r.path), config, summary,
                        _history_frame(rows)))
    return runs


# ---------------------------------------------------------------- tables

DEFAULT_METRICS = ("test/acc", "test/loss", "val/acc_best", "val/acc", "train/loss",
                   "wall_time_s")


def summary_table(runs: list[Run], metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per preset: mean and std over runs (seeds) of each final metric, and n."""
    rows = [{"preset": r.preset, "seed": r.seed, **r.summary} for r in runs]
    frame = pd.DataFrame(rows)
    wanted = [m for m in (metrics or DEFAULT_METRICS) if m in frame]
    if not wanted:
        wanted = [m for m in frame.columns if m not in ("preset", "seed")
                  and pd.api.types.is_numeric_dtype(frame[m])][:6]
    grouped = frame.groupby("preset", sort=True)
    table = pd.DataFrame({"n": grouped.size()})
    for m in wanted:
        values = pd.to_numeric(frame[m], errors="coerce").groupby(frame["preset"])
        table[f"{m} mean"] = values.mean()
        table[f"{m} std"] = values.std(ddof=1)
    return table


def format_table(table: pd.DataFrame) -> str:
    """'mean ± std' columns, as a paper's table shows them."""
    out = pd.DataFrame({"n": table["n"]})
    for col in table.columns:
        if col.endswith(" mean"):
            name = col[: -len(" mean")]
            std = table[f"{name} std"]
            out[name] = [_pm(m, s) for m, s in zip(table[col], std)]
    return out.to_string()


def _pm(mean: float, std: float) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "-"
    digits = 4 if abs(mean) < 10 else 1
    spread = "" if std is None or math.isnan(std) else f" ± {std:.{digits}f}"
    return f"{mean:.{digits}f}{spread}"


LAYERS_KEY = "q8_stats_layers"  # the network's layer order, written by QuantStatsCallback
LAYER_KEY = re.compile(r"^(quant|grads)/(.+)/([a-z_]+)$")  # a per-layer key: kind/layer/metric
LAYER_METRICS = ("quant/weight_sqnr_db", "quant/act_sqnr_db", "quant/grad_sqnr_db",
                 "quant/wgrad_sqnr_db", "quant/wgrad_cosine", "grads/wgrad_norm")


def layer_names(runs: list[Run], metric_suffix: str = "") -> list[str]:
    """The layers with per-layer keys ending in `metric_suffix` in `runs`' histories, in the
    network's order as QuantStatsCallback records it (the CSV and W&B sort keys by name)."""
    logged = {m.group(2) for r in runs for col in r.history.columns
              if (m := LAYER_KEY.match(col)) and col.endswith(metric_suffix)}
    recorded = [name for r in runs for name in (r.config.get(LAYERS_KEY) or [])]
    return [name for name in dict.fromkeys([*recorded, *sorted(logged)]) if name in logged]


def layer_table(runs: list[Run], tail: float = 0.5) -> pd.DataFrame:
    """Per-layer statistics: each run's mean over the last `tail` of its logged points, then
    mean and std over the runs of a preset. Layers keep the network's order."""
    rows = []
    for r in runs:
        h = r.history
        for col in h.columns:
            m = LAYER_KEY.match(col)
            if not m:
                continue
            series = pd.to_numeric(h[col], errors="coerce").dropna()
            if series.empty:
                continue
            last = series.iloc[int(len(series) * (1 - tail)):]
            rows.append({"preset": r.preset, "layer": m.group(2),
                         "metric": f"{m.group(1)}/{m.group(3)}", "value": last.mean()})
    if not rows:
        return pd.DataFrame(columns=["preset", "layer", "metric", "mean", "std", "order"])
    frame = pd.DataFrame(rows)
    order = {layer: i for i, layer in enumerate(layer_names(runs))}
    table = frame.groupby(["preset", "metric", "layer"], sort=False)["value"].agg(
        ["mean", "std"]).reset_index()
    table["order"] = table["layer"].map(order)
    return table.sort_values(["preset", "metric", "order"]).reset_index(drop=True)


# ---------------------------------------------------------------- figures

CURVES = (("train/loss_step", "train/loss"), ("val/loss",), ("train/acc_epoch", "train/acc"),
          ("val/acc",))


def plot_curves(runs: list[Run], path: Path) -> list[str]:
    """Loss and accuracy against steps: the mean over seeds per preset, min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for candidates in CURVES:
        key = next((k for k in candidates if any(k in r.history for r in runs)), None)
        if key:
            panels.append(key)
    if not panels:
        return []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    presets = sorted({r.preset for r in runs})
    for ax, key in zip(axes[0], panels):
        for i, preset in enumerate(presets):
            parts = [r.history[["step", key]].dropna() for r in runs
                     if r.preset == preset and key in r.history and "step" in r.history]
            if not parts:
                continue
            stats = pd.concat(parts).groupby("step")[key].agg(["mean", "min", "max"])
            color = f"C{i}"
            marker = "o" if len(stats) <= 30 else None  # per-epoch values: show the points
            ax.plot(stats.index, stats["mean"], color=color, label=preset, lw=1.2,
                    marker=marker, ms=3)
            ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2,
                            lw=0)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return panels


def plot_layers(table: pd.DataFrame, path: Path) -> list[str]:
    """Per-layer SQNR of W, x, g_l and the g_W copy, cos(g_W), |g_W| by preset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in LAYER_METRICS if m in set(table["metric"])]
    if not metrics:
        return []
    layers = list(dict.fromkeys(table.sort_values("order")["layer"]))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 0.32 * len(layers) + 2),
                                                       2.4 * len(metrics)), squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for i, preset in enumerate(sorted(set(table["preset"]))):
            t = table[(table["preset"] == preset) & (table["metric"] == metric)]
            if t.empty:
                continue
            mean = 1 - t["mean"] if metric.endswith("cosine") else t["mean"]
            ax.errorbar(t["order"], mean, yerr=t["std"].fillna(0), color=f"C{i}",
                        marker="o", ms=3, lw=1, capsize=2, label=preset)
        label = metric.split("/", 1)[1]
        ax.set_ylabel(f"1 - {label}" if metric.endswith("cosine") else label, fontsize=8)
        if metric.endswith(("cosine", "_norm")):  # 1 - cos spans decades
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([], fontsize=6)
    axes[-1, 0].set_xticklabels(layers, rotation=90, fontsize=6)
    axes[0, 0].legend(fontsize=7, ncol=4)
    axes[0, 0].set_title("per-layer quantization error (mean over the last half of training)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return metrics


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories (or folders of them), or W&B paths "
                   "(ENTITY/PROJECT or ENTITY/PROJECT/RUN_ID)")
    p.add_argument("--filters", help="W&B MongoDB-style run filters (JSON), online only")
    p.add_argument("--metrics", nargs="*", help=f"final metrics (default: {DEFAULT_METRICS})")
    p.add_argument("--out", default="compare", help="folder for the CSV tables and PNG plots")
    args = p.parse_args(argv)

    runs: list[Run] = []
    for spec in args.runs:
        path = Path(spec)
        if path.exists():
            found = load_local(path)
            if not found:
                print(f"warning: no run found under {path}", file=sys.stderr)
            runs += found
        elif re.fullmatch(r"[\w.-]+/[\w.-]+(/[\w.-]+)?", spec):
            runs += load_online(spec, args.filters)
        else:
            p.error(f"{spec}: no such file or directory, and not a W&B path ENTITY/PROJECT")
    if not runs:
        print("error: no runs to compare", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = summary_table(runs, args.metrics)
    table.to_csv(out / "summary.csv")
    print(f"{len(runs)} runs, {len(table)} presets (mean ± std over seeds)\n")
    print(format_table(table))
    layers = layer_table(runs)
    if not layers.empty:
        layers.to_csv(out / "layers.csv", index=False)
    written = []
    if plot_curves(runs, out / "curves.png"):
        written.append(out / "curves.png")
    if plot_layers(layers, out / "layers.png"):
        written.append(out / "layers.png")
    print("\nwrote " + ", ".join(str(w) for w in [out / "summary.csv", *written]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
