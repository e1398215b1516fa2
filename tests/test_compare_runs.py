"""q8.lit.run_history, scripts/compare_runs.py and scripts/dashboard.py on runs made here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("conv1", "layer1.0.conv1", "fc")


def make_run(run_dir: Path, preset: str, seed: int, acc: float, steps: int = 120) -> None:
    """A run directory as train.py leaves it: Lightning's CSV log (csv/metrics.csv and
    hparams.yaml) and metrics.json."""
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(str(run_dir), name="csv", version="")
    logger.log_hyperparams({"quant_name": preset, "seed": seed, "q8_stats_layers": list(LAYERS)})
    sqnr = 40.0 if preset.startswith("q8") else 90.0
    for step in range(steps):
        logger.log_metrics({"train/loss_step": 2.0 / (1 + step) + seed * 0.01}, step=step)
        if step % 10 == 0:  # per-layer keys, as QuantStatsCallback logs them: a row of their own
            row = {}
            for i, layer in enumerate(LAYERS):
                row[f"quant/{layer}/grad_sqnr_db"] = sqnr + i
                row[f"quant/{layer}/wgrad_cosine"] = 0.999
                row[f"grads/{layer}/wgrad_norm"] = 0.1 * (i + 1)
            logger.log_metrics(row, step=step)
        if step % 40 == 39:
            logger.log_metrics({"val/acc": acc * step / steps, "epoch": step // 40}, step=step)
    logger.finalize("success")
    metrics = {"test/acc": acc, "test/loss": 1 - acc, "val/acc_best": acc, "quant": preset,
               "seed": seed, "model": "resnet18"}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    make_run(root / "q8_s0", "q8_bifurcated", 0, 0.90)
    make_run(root / "q8_s1", "q8_bifurcated", 1, 0.92)
    make_run(root / "fp32_s0", "fp32", 0, 0.95)
    return root


def test_the_csv_log_reads_back_every_row(runs_root):
    from q8.lit.run_history import read_history, read_hparams, values

    run = runs_root / "q8_s0"
    assert read_hparams(run)["quant_name"] == "q8_bifurcated"
    assert read_hparams(run)["q8_stats_layers"] == list(LAYERS)
    history = read_history(run)
    # one row per logging call: 120 loss rows, 12 per-layer rows, 3 validation rows
    assert len(history) == 120 + 12 + 3
    loss = values(history, "train/loss_step")
    assert list(loss.index) == list(range(120))
    # the CSV holds the float's shortest repr: it reads back exactly
    assert list(loss) == [2.0 / (1 + s) for s in range(120)]
    assert dict(values(history, "quant/fc/grad_sqnr_db")) == {s: 42.0 for s in range(0, 120, 10)}
    assert values(history, "no/such/key").empty
    with pytest.raises(FileNotFoundError, match="logger=wandb or logger=csv"):
        read_history(runs_root)


def test_a_resumed_runs_launches_read_as_one_history(tmp_path):
    """Launch 1 logged steps 0-5 and stopped; its checkpoint was at step 4, so launch 2 logged
    4-7 again and on (with its own hparams). The history: 0-3 from launch 1, 4-9 from launch 2."""
    from q8.lit.run_history import metrics_files, read_history, read_hparams, values

    for version, steps, value in [(0, range(6), 1.0), (1, range(4, 10), 2.0)]:
        logs = tmp_path / "csv" / f"version_{version}"
        logs.mkdir(parents=True)
        rows = ["step,epoch,train/loss_step"] + [f"{s},0,{value + s}" for s in steps]
        (logs / "metrics.csv").write_text("\n".join(rows) + "\n")
        (logs / "hparams.yaml").write_text(f"launch: {version}\n")
    (tmp_path / "csv" / "version_10").mkdir()  # no metrics.csv: not a launch that logged
    assert [f.parent.name for f in metrics_files(tmp_path)] == ["version_0", "version_1"]
    loss = values(read_history(tmp_path), "train/loss_step")
    assert dict(loss) == {**{s: 1.0 + s for s in range(4)}, **{s: 2.0 + s for s in range(4, 10)}}
    assert read_hparams(tmp_path) == {"launch": 1}


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
    assert cr.layer_names(cr.load_local(runs_root), "_sqnr_db") == list(LAYERS)
    assert cr.layer_names(cr.load_local(runs_root), "_no_such_metric") == []


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


def test_dashboard_takes_the_layers_of_a_run_from_any_directory(runs_root, tmp_path):
    """Run as a script, from outside the repository: it finds compare_runs.py beside it and the
    installed q8, and gives each layer of the run a panel, in the network's order."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "dashboard.py"), "my-team/q8", "--dry-run",
         "--from-run", str(runs_root / "q8_s0")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    section = proc.stdout.split("section SQNR by layer", 1)[1]
    panels = [line.split(":", 1)[1].split("[", 1)[0].strip()
              for line in section.splitlines() if line.strip().startswith("line:")]
    assert panels == list(LAYERS)
