"""scripts/bench.py (issue 4): the table and JSON it writes, and its paired time ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_paired_ratio_is_the_median_of_side_by_side_ratios(load_script) -> None:
    bench = load_script("bench")
    ratio, (q1, q3) = bench.paired_ratio([2.0, 4.0, 3.0, 9.0], [1.0, 2.0, 1.0, 3.0])
    assert ratio == 2.5 and (q1, q3) == (2.0, 3.0)  # ratios 2, 2, 3, 3
    # the machine slows down 3x for the second half: each pair still reads 1.3
    fp32 = [1.0, 1.0, 3.0, 3.0, 3.0]
    ratio, iqr = bench.paired_ratio([1.3 * t for t in fp32], fp32)
    assert ratio == pytest.approx(1.3) and iqr == pytest.approx([1.3, 1.3])
    assert bench.paired_ratio([2.0], [1.0]) == (2.0, [2.0, 2.0])


def test_bench_prints_the_table_and_writes_json(load_script, tmp_path: Path, capsys) -> None:
    bench = load_script("bench")
    out = bench.main(["--batch", "4", "--image-size", "16", "--steps", "2", "--warmup", "1",
                      "--backend", "auto", "--json", str(tmp_path / "b.json")])
    table = capsys.readouterr().out
    assert "| preset | step ms | x fp32 |" in table and "| q8_bifurcated |" in table
    saved = json.loads((tmp_path / "b.json").read_text())
    assert saved["results"] == json.loads(json.dumps(out["results"]))
    fp32, q8 = saved["results"]
    assert fp32["preset"] == "fp32" and fp32["step_ratio"] == 1.0
    assert q8["step_ratio"] > 0 and len(q8["step_ratio_iqr"]) == 2
    # saved activations are 8-bit codes (1/4 of fp32) or 1-bit ReLU masks (1/32), plus scales
    # and Range BN's per-chunk extremes, which weigh more on tiny images (0.24 at 32x32, b128)
    assert q8["saved_ratio"] == q8["saved_bytes"] / fp32["saved_bytes"] < 0.4


def test_gemm_curves_runs_every_mode_and_writes_its_files(load_script, tmp_path: Path) -> None:
    curves = load_script("gemm_curves")
    out = curves.main(["--steps", "4", "--window", "2", "--seeds", "0,1", "--batch", "8",
                       "--image-size", "16", "--out", str(tmp_path)])
    assert set(out["verdicts"]) == {"codes", "int8"}
    assert all(len(v["diffs"]) == 2 for v in out["verdicts"].values())
    rows = (tmp_path / "curves.csv").read_text().splitlines()
    assert rows[0] == "mode,seed,step,loss" and len(rows) == 1 + 3 * 2 * 4
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_curve_verdict_is_twice_the_seed_spread(load_script) -> None:
    curves = load_script("gemm_curves")
    base = {0: [1.0, 1.0], 1: [3.0, 3.0]}  # window sd sqrt(2): bound 2.83
    near = {"dequantized": base, "codes": {0: [4.0, 4.0], 1: [4.0, 4.0]}}  # 2 from the mean
    far = {"dequantized": base, "codes": {0: [5.0, 5.0], 1: [5.0, 5.0]}}  # 3 from the mean
    assert curves.verdicts(near, 2)["codes"]["agrees"]
    assert not curves.verdicts(far, 2)["codes"]["agrees"]
