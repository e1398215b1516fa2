"""scripts/bench.py and scripts/gemm_curves.py: the tables, JSON and curves they write, and
the statistics they judge by."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


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
    with pytest.raises(SystemExit) as exit_info:  # one seed has no spread to bound by
        curves.main(["--seeds", "0"])
    assert exit_info.value.code == 2


def test_peak_live_tensors_counts_each_new_storage_while_it_lives(load_script) -> None:
    bench = load_script("bench")
    x = torch.zeros(1024)  # made outside the block: not counted
    with bench.PeakLiveTensors(breakdown=True) as live:
        a = torch.ones(256)  # 1 KiB
        a.add_(1)  # in place: nothing new
        a.view(16, 16).sum(), x[:10].neg_()  # views (and a 4-byte sum): nothing new
        b = x * 2  # 4 KiB: peak 5 KiB (the sum's 4 bytes were freed at once)
        at_peak = dict(live.at_peak)
        del a, b
        c = torch.ones(512, dtype=torch.float64)  # 4 KiB after both were freed
    assert live.peak == 256 * 4 + 1024 * 4 and live.bytes == 512 * 8
    assert at_peak == {"ones -> float32": 1024, "mul -> float32": 4096}
    del c


def test_peak_live_tensors_sees_autograd_temporaries(load_script) -> None:
    """A backward's peak includes the gradients it makes and frees, beyond what forward saved."""
    bench = load_script("bench")
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)
    with bench.PeakLiveTensors() as live:
        (x @ w).relu().sum().backward()
    # forward: x@w, 8 KiB, freed once relu has made its saved 8 KiB output. Backward: the loss
    # and its seed gradient (4 bytes each), relu's 8 KiB input gradient (its saved output is
    # released once its node has run), then w.grad = x^T g, 16 KiB, while that gradient lives
    assert live.peak == 4 + 4 + 8192 + 16384
