"""scripts/compare_runs.py and scripts/dashboard.py on offline runs made here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("conv1", "layer1.0.conv1", "fc")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


def make_run(run_dir: Path, preset: str, seed: int, acc: float, steps: int = 120) -> None:
    """A run directory as train.py leaves it: an offline W&B run and metrics.json."""
    import wandb

    run_dir.mkdir(parents=True)
    run = wandb.init(project="q8-test", dir=str(run_dir), name=f"resnet18-{preset}-s{seed}",
                     group="test", config={"quant_name": preset, "seed": seed,
                             "q8_stats_layers": list(LAYERS)}, reinit=True)
    sqnr = 40.0 if preset.startswith("q8") else 90.0
    for step in range(steps):
        row = {"trainer/global_step": step, "train/loss_step": 2.0 / (1 + step) + seed * 0.01}
        if step % 10 == 0:  # per-layer keys, as QuantStatsCallback logs them
            for i, layer in enumerate(LAYERS):
                row[f"quant/{layer}/grad_sqnr_db"] = sqnr + i
                row[f"quant/{layer}/wgrad_cosine"] = 0.999
                row[f"grads/{layer}/wgrad_norm"] = 0.1 * (i + 1)
        if step % 40 == 39:
            row["val/acc"] = acc * step / steps
        run.log(row)
    run.finish()
    metrics = {"test/acc": acc, "test/loss": 1 - acc, "val/acc_best": acc, "quant": preset,
               "seed": seed, "model": "resnet18"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        root = tmp_path_factory.mktemp("runs")
        make_run(root / "q8_s0", "q8_bifurcated", 0, 0.90)
        make_run(root / "q8_s1", "q8_bifurcated", 1, 0.92)
        make_run(root / "fp32_s0", "fp32", 0, 0.95)
    return root


def test_offline_run_file_reads_back_every_row(runs_root, load_script):
    cr = load_script("compare_runs")
    (path,) = runs_root.glob("q8_s0/wandb/offline-run-*/run-*.wandb")
    assert path.stat().st_size > 32768  # records cross a block boundary
    data = cr.read_wandb_file(path)
    assert data["run"]["name"] == "resnet18-q8_bifurcated-s0"
    assert data["config"]["quant_name"] == "q8_bifurcated"
    steps = [r["trainer/global_step"] for r in data["history"] if "trainer/global_step" in r]
    assert steps == list(range(120))
    assert data["summary"]["quant/fc/grad_sqnr_db"] == 42.0


def test_two_presets_become_a_table_and_figures(runs_root, tmp_path, capsys, load_script):
    cr = load_script("compare_runs")
    out = tmp_path / "cmp"
    assert cr.main([str(runs_root / "q8_s0"), str(runs_root / "q8_s1"),
                    str(runs_root / "fp32_s0"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 runs, 2 presets" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("q8_bifurcated"))
    # mean and sample std over the two seeds: 0.91 ± 0.0141
    assert "0.9100 ± 0.0141" in line
    table = cr.summary_table(cr.load_local(runs_root))
    assert table.loc["q8_bifurcated", "n"] == 2
    assert table.loc["q8_bifurcated", "test/acc mean"] == pytest.approx(0.91)
    assert table.loc["q8_bifurcated", "test/acc std"] == pytest.approx(0.02 / math.sqrt(2))
    assert math.isnan(table.loc["fp32", "test/acc std"])  # one seed: no spread
    for png in ("curves.png", "layers.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    import pandas as pd

    layers = pd.read_csv(out / "layers.csv")
    sqnr = layers[(layers.metric == "quant/grad_sqnr_db") & (layers.preset == "fp32")]
    assert list(sqnr.layer) == list(LAYERS)  # network order, not alphabetical
    assert list(sqnr["mean"]) == [90.0, 91.0, 92.0]


def test_csv_only_runs_are_read(tmp_path, capsys, load_script):
    cr = load_script("compare_runs")
    for seed in (0, 1):
        run = tmp_path / f"csv_s{seed}"
        (run / "csv").mkdir(parents=True)
        rows = ["step,epoch,train/loss_step,val/acc,quant/conv1/act_sqnr_db"]
        rows += [f"{s},0,{1.0 / (s + 1)},,{40 + seed}" for s in range(5)]
        rows.append(f"4,0,,{0.5 + seed * 0.1},")
        (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
        (run / "metrics.json").write_text(json.dumps(
            {"test/acc": 0.5 + seed * 0.1, "quant": "q4", "seed": seed}))
    assert cr.main([str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "q4" in capsys.readouterr().out
    assert (tmp_path / "out" / "curves.png").is_file()
    assert (tmp_path / "out" / "layers.csv").is_file()


def test_dashboard_dry_run_prints_the_panels(capsys, load_script):
    dash = load_script("dashboard")
    assert dash.main(["my-team/q8", "--dry-run", "--layers", "conv1", "fc"]) == 0
    text = capsys.readouterr().out
    for expected in ("my-team/q8", "val/acc", "train/loss", "quant_name",
                     "quant/conv1/grad_sqnr_db", "grads/.*/wgrad_norm"):
        assert expected in text
