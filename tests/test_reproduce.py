"""Fidelity (issue 8): the fast subset of scripts/reproduce.py trains fp32 and q8_bifurcated
for real and checks parity loosely; the report is built from the runs' own files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_fast_reproduction_trains_both_and_checks_parity(tmp_path: Path) -> None:
    """--fast: fp32 and q8_bifurcated, seed 0, 5 epochs of the digits_parity recipe (about half a
    minute each here). Both must learn (chance is 10%) and stay within reproduce.py's bound."""
    out = tmp_path / "reproduce"
    proc = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--fast", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for name in ("fp32", "q8_bifurcated"):
        metrics = json.loads((out / name / "seed0" / "metrics.json").read_text())
        assert metrics["epochs"] == 5 and metrics["seed"] == 0
        assert metrics["test/acc"] > 0.8, (name, metrics["test/acc"])
    assert "parity: q8_bifurcated - fp32 =" in proc.stdout
    report = (out / "RESULTS.md").read_text()
    assert "python scripts/reproduce.py --fast --out" in report  # the command that made it
    assert "| `q8_bifurcated` |" in report and "| `fp32` |" in report
    assert (out / "results" / "bits.png").is_file()


def test_report_flags_a_broken_parity_bound(tmp_path: Path, load_script) -> None:
    """The report and the --fast check read metrics.json: a gap beyond the bound fails."""
    reproduce = load_script("reproduce")
    out = tmp_path / "runs"
    for name, acc in (("fp32", 0.99), ("q8_bifurcated", 0.90)):
        run = out / name / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(
            {"test/acc": acc, "train/loss": 0.1, "wall_time_s": 60.0}))
    code = reproduce.main(["--fast", "--report-only", "--out", str(out)])
    assert code == 1  # 9 points apart, the bound is 5
    report = (out / "RESULTS.md").read_text()
    assert "`q8_bifurcated` − `fp32` | -9.00 | n/a | 1 and 1 | **NO** |" in report
    assert reproduce.main(["--fast", "--report-only", "--out", str(out), "--bound", "10"]) == 0


def test_claims_get_more_seeds_and_a_verdict_each(tmp_path: Path, load_script) -> None:
    """The parity and Range BN configurations run --claim-seeds seeds, the ablations --seeds;
    each claim's line gives the difference of means, its standard error and the verdict."""
    reproduce = load_script("reproduce")
    seeds = reproduce.plan(reproduce.CONFIGS, [0, 1, 2], 5)
    assert seeds["fp32"] == seeds["q8_batchnorm"] == [0, 1, 2, 3, 4]
    assert seeds["q8_nearest_grads"] == seeds["all2"] == [0, 1, 2]
    accs = {"fp32": [0.99, 0.98], "q8_bifurcated": [0.986, 0.976],
            "fp32_range_bn": [0.96, 0.97], "q8_batchnorm": [0.99, 0.99]}
    runs = {name: [{"test/acc": a} for a in values] for name, values in accs.items()}
    lines = "\n".join(reproduce.claims_table(runs))
    # standard error: sqrt(s_a^2 / 2 + s_b^2 / 2) with both variances 0.5 (points^2)
    assert "`q8_bifurcated` − `fp32` | -0.40 | 0.71 | 2 and 2 | **yes** |" in lines
    assert "`fp32_range_bn` − `fp32` | -2.00 | 0.71 | 2 and 2 | **NO** |" in lines
    assert "`q8_bifurcated` − `q8_batchnorm` | -0.90 | 0.50 | 2 and 2 | **NO** |" in lines
    runs["fp32"] = [{"test/acc": a} for a in (0.97, 0.96)]  # q8 now 1.6 points above fp32
    lines = "\n".join(reproduce.claims_table(runs))
    assert "| +1.60 | 0.71 | 2 and 2 | **NO** (`q8_bifurcated` higher) |" in lines


def test_a_diverged_run_is_a_result_not_a_missing_run(tmp_path: Path, load_script,
                                                       monkeypatch) -> None:
    """At 2 bits training can go non-finite: the nan guard stops it, and the report shows the
    step it diverged at instead of failing the reproduction. Other crashes stay failures."""
    reproduce = load_script("reproduce")
    out = tmp_path / "runs"
    config = next(c for c in reproduce.CONFIGS if c.name == "all2")
    logs = {1: "error: non-finite value at step 78, first at model.layer3: g_l\n",
            2: "Traceback (most recent call last):\nRuntimeError: out of memory\n"}

    def fake_run(cmd, cwd, env, stdout, stderr):  # noqa: ANN001, ANN202
        stdout.write(logs[int(next(a for a in cmd if a.startswith("seed="))[5:])])
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(reproduce.subprocess, "run", fake_run)
    assert reproduce.train(out, config, 1, [])[2].startswith("diverged at step 78")
    assert reproduce.train(out, config, 2, [])[2].startswith("FAILED (exit 1")
    run0 = reproduce.run_dir(out, config, 0)
    run0.mkdir(parents=True)
    (run0 / "metrics.json").write_text(json.dumps({"test/acc": 0.1, "train/loss": 2.3}))
    finished = [reproduce.finished(reproduce.run_dir(out, config, s)) for s in (0, 1, 2)]
    assert finished == [True, True, False]
    runs = reproduce.load(out, [config], {"all2": [0, 1, 2]})
    row = reproduce.table([config], runs, "all2")[-1]
    assert "| 10.00 (1 of 2 diverged) |" in row and "| 10.0, diverged at step 78 |" in row
