"""scripts/reproduce.py: the fast subset trains fp32 and q8_bifurcated for real and checks
parity loosely; the report is built from the runs' own files and the paper's data file."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # two 5-epoch runs: about a minute on 2 CPU cores
def test_fast_reproduction_trains_both_and_checks_parity(tmp_path: Path) -> None:
    """--fast: fp32 and q8_bifurcated, seed 0, 5 epochs of the digits_parity recipe (about half a
    minute each here), end to end: both runs finish, their loss falls, the report is written.

    No accuracy of this one seed is checked: one seed's q8 - fp32 gap is training noise (it
    measured -3.1 and -10.6 points on two noise streams). What a seed fixes is deterministic:
    with the seed and the CPU backend fixed, each run's final training loss is one number, and
    it must lie far below chance's ln 10 = 2.30 (a run that learns ends near 0.05). The parity
    bound itself is tested on made-up metrics below, so it is opened wide here."""
    out = tmp_path / "reproduce"
    proc = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--fast", "--out", str(out), "--bound", "100"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "[1/2] resnet18/fp32 seed 0: ok" in proc.stdout  # a line per run as it ends
    assert "[2/2] resnet18/q8_bifurcated seed 0: ok" in proc.stdout
    for name in ("fp32", "q8_bifurcated"):
        metrics = json.loads((out / "resnet18" / name / "seed0" / "metrics.json").read_text())
        assert metrics["epochs"] == 5 and metrics["seed"] == 0
        assert metrics["train/loss"] < math.log(10) / 4, (name, metrics["train/loss"])
    assert "parity: q8_bifurcated - fp32 =" in proc.stdout
    report = (out / "RESULTS.md").read_text()
    assert "python scripts/reproduce.py --fast --out" in report  # the command that made it
    assert "| resnet18 | SGD |" in report  # the parity row of the one family
    assert "| n/a | not resolved (one seed) |" in report
    assert ", 5 epochs, batch 64," in report  # the recipe says what the runs did
    assert (out / "results" / "digits_parity_parity.png").is_file()


def test_report_flags_a_broken_parity_bound(tmp_path: Path, load_script) -> None:
    """The report and the --fast check read metrics.json: a gap beyond the bound fails."""
    reproduce = load_script("reproduce")
    out = tmp_path / "runs"
    for name, acc in (("fp32", 0.99), ("q8_bifurcated", 0.90)):
        run = out / "resnet18" / name / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(
            {"test/acc": acc, "train/loss": 0.1, "wall_time_s": 60.0}))
    code = reproduce.main(["--fast", "--report-only", "--out", str(out)])
    assert code == 1  # 9 points apart, the bound is 5
    report = (out / "RESULTS.md").read_text()
    assert "| 99.00 | 90.00 | -9.00 | n/a | not resolved (one seed) |" in report
    assert reproduce.main(["--fast", "--report-only", "--out", str(out), "--bound", "10"]) == 0


def test_parity_verdict_is_the_interval_against_the_target(load_script) -> None:
    """Each family's row: the two means, their difference, Welch's 95% interval and the verdict:
    parity when the whole interval lies above -0.5 points, NO when it lies below."""
    reproduce = load_script("reproduce")
    suite = reproduce.SUITES["fashion_mnist"]

    def runs(fp32: list[float], q8: list[float]) -> dict[str, list[dict]]:
        return {"resnet18/fp32": [{"test/acc": a / 100} for a in fp32],
                "resnet18/q8_bifurcated": [{"test/acc": a / 100} for a in q8]}

    # both variances 0.5 (points^2), two seeds each: standard error sqrt(0.25 + 0.25) = 0.71,
    # Welch's degrees of freedom 0.25 / (0.0625 + 0.0625) = 2, t(0.975, 2) = 4.303: d +- 3.04
    row = reproduce.parity_table(suite, runs([99.0, 98.0], [98.6, 97.6]))[-1]
    assert "| 98.50 ± 0.71 | 98.10 ± 0.71 | -0.40 | [-3.44, +2.64] | not resolved |" in row
    # four seeds each, std 0.0816 on both sides: standard error sqrt(2 * 0.00667 / 4) = 0.0577,
    # 6 degrees of freedom, t(0.975, 6) = 2.447: d +- 0.14, which resolves both verdicts
    fp32 = [98.8, 98.7, 98.9, 98.8]
    row = reproduce.parity_table(suite, runs(fp32, [a - 0.2 for a in fp32]))[-1]
    assert "| -0.20 | [-0.34, -0.06] | **yes** |" in row
    row = reproduce.parity_table(suite, runs(fp32, [a - 1.0 for a in fp32]))[-1]
    assert "| -1.00 | [-1.14, -0.86] | **NO** |" in row
    assert reproduce.verdict((-0.49, 2.0), 0.5) == "**yes**"
    assert reproduce.verdict((-0.51, 2.0), 0.5) == "not resolved"


def test_every_configuration_names_its_family_and_a_preset(load_script) -> None:
    """Each suite runs fp32 and q8_bifurcated for every family, and the ablations on ResNet-18;
    every quant preset a configuration names exists."""
    reproduce = load_script("reproduce")
    suite = reproduce.SUITES["fashion_mnist"]
    names = {c.name for c in suite.configs}
    for family in suite.families:
        assert {f"{family.name}/fp32", f"{family.name}/q8_bifurcated"} <= names
    assert {"resnet18/q8_paper", "resnet18/q8_no_bifurcation", "resnet18/all4"} <= names
    for c in suite.configs:
        presets = [o.split("=", 1)[1] for o in c.overrides if o.startswith("quant=")]
        assert len(presets) == 1 and (ROOT / "conf" / "quant" / f"{presets[0]}.yaml").is_file()


@pytest.mark.parametrize("suite", ["fashion_mnist", "digits"])
def test_every_parity_run_composes_and_builds_its_model(suite: str, load_script) -> None:
    """Each family's fp32 run, as train.py composes it from the suite's experiment and the
    family's overrides, builds the timm model it names (digits_parity's narrow ResNet-18
    kwargs are dropped for the timm families)."""
    from q8.lit.models import create_backbone
    from tests.conftest import compose_config

    reproduce = load_script("reproduce")
    s = reproduce.SUITES[suite]
    for family in s.families:
        cfg = compose_config([f"experiment={s.experiment}", *family.overrides, "quant=fp32"])
        names = [o.split("=", 1)[1] for o in family.overrides if o.startswith("model.name=")]
        assert cfg.model.name == (names[0] if names else "resnet18")
        kwargs = dict(cfg.model.kwargs)
        assert ("channels" in kwargs) == (suite == "digits" and family.name == "resnet18")
        with torch.device("meta"):
            create_backbone(cfg.model.name, 10, 1, cfg.model.small_input, kwargs)


def test_the_papers_numbers_come_from_its_data_file(tmp_path: Path, load_script) -> None:
    """The last table of the report is scripts/paper_results.yaml, row by row; each row names an
    experiment config that exists."""
    reproduce = load_script("reproduce")
    paper = yaml.safe_load(reproduce.PAPER.read_text())
    for row in paper["rows"]:
        assert (ROOT / "conf" / "experiment" / f"{row['experiment']}.yaml").is_file(), row
    made_up = tmp_path / "paper.yaml"
    made_up.write_text(yaml.safe_dump({"source": "Made up.", "rows": [
        {"experiment": "e1", "recipe": "r", "metric": "top-1 error %", "fp32": 30,
         "bits": {8: 31.5}},
        {"experiment": "e2", "recipe": "r2", "metric": "accuracy %", "bits": {8: 90, 4: 80},
         "note": "n"}]}))
    lines = reproduce.paper_table(made_up)
    assert lines[0] == "Made up."
    assert lines[-2:] == ["| `experiment=e1` | r | top-1 error % | ~30 | ~31.5 |  |  |",
                          "| `experiment=e2` | r2 | accuracy % |  | ~90 | ~80 at 4 bits | n |"]


def test_a_diverged_run_is_a_result_not_a_missing_run(tmp_path: Path, load_script,
                                                       monkeypatch, capsys) -> None:
    """At 2 bits training can go non-finite: the nan guard stops it, and the report shows the
    step it diverged at instead of failing the reproduction. Other crashes stay failures."""
    reproduce = load_script("reproduce")
    out = tmp_path / "runs"
    config = reproduce.Config("resnet18/all2", "bits", "all in 2 bits", ("quant=q8_bifurcated",))
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
    runs = reproduce.load(out, [config], [0, 1, 2])
    row = reproduce.table([config], runs, "resnet18/all2")[-1]
    assert "| 10.00 (1 of 2 diverged) |" in row and "| 10.00, diverged at step 78 |" in row
    # a second pass runs only what has no result yet, one line per run
    reproduce.run_all(out, [config], [0, 1, 2], [])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["[1/3] resnet18/all2 seed 0: done before (0 s)",
                         "[2/3] resnet18/all2 seed 1: done before (0 s)"]
    assert lines[2].startswith("[3/3] resnet18/all2 seed 2: FAILED (exit 1")


def test_a_partial_reproduction_reports_what_it_has_and_names_the_rest(tmp_path: Path,
                                                                        load_script) -> None:
    """Runs cut short: the tables hold the finished configurations, a line names the others."""
    reproduce = load_script("reproduce")
    out = tmp_path / "runs"
    for name, acc in (("fp32", 0.90), ("q8_bifurcated", 0.89), ("q8_paper", 0.88)):
        run = out / "resnet18" / name / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps(
            {"test/acc": acc, "train/loss": 0.3, "wall_time_s": 60.0, "epochs": 3}))
    suite = reproduce.SUITES["fashion_mnist"]
    text = reproduce.report(out, suite, suite.configs, [0], "cmd", None, tmp_path / "R.md")
    assert "| resnet18 | SGD | 90.00 | 89.00 | -1.00 | n/a | not resolved (one seed) |" in text
    assert "| `q8_paper` |" in text and "| `q8_no_bifurcation` |" not in text
    missing = next(line for line in text.splitlines() if line.startswith("Configurations with"))
    assert "`resnet18/q8_no_bifurcation`" in missing and "`vit_tiny/fp32`" in missing
    assert "`resnet18/q8_paper`" not in missing


def test_a_section_on_two_families_has_a_table_for_each(tmp_path: Path, load_script) -> None:
    """The gates section runs on EfficientNet-B0 (at lr 0.03) and MobileNetV3: each family's
    8-bit-gate runs sit in their own table, against that family's q8_bifurcated."""
    reproduce = load_script("reproduce")
    out = tmp_path / "runs"
    accs = {"efficientnet_b0_lr0.03": (0.80, 0.79), "mobilenetv3_small_100": (0.70, 0.66)}
    for family, (default, gates8) in accs.items():
        for name, acc in (("q8_bifurcated", default), ("gates8", gates8)):
            run = out / family / name / "seed0"
            run.mkdir(parents=True)
            (run / "metrics.json").write_text(json.dumps({"test/acc": acc, "epochs": 3}))
    suite = reproduce.SUITES["fashion_mnist"]
    text = reproduce.report(out, suite, suite.configs, [0], "cmd", None, tmp_path / "R.md")
    for family, delta in (("efficientnet_b0_lr0.03", "-1.00"),
                          ("mobilenetv3_small_100", "-4.00")):
        section = text.split(f"8 bits ({family})", 1)[1].split("##", 1)[0]
        assert f"Δ vs `{family}/q8_bifurcated`" in section
        gates8 = next(line for line in section.splitlines() if line.startswith("| `gates8`"))
        assert f"| {delta} |" in gates8


def test_a_loss_jump_is_a_logged_loss_a_nat_above_the_lowest_before_it(tmp_path: Path,
                                                                      load_script) -> None:
    """Counted from the run's CSV log: 2.625 after a low of 1.5 and 2.25 after 1.0 jump; 2.5 after
    1.5 lies exactly 1 above (not a jump), and the first loss has nothing before it. The tables
    say how many runs jumped."""
    reproduce = load_script("reproduce")
    run = tmp_path / "resnet18" / "q8_bifurcated" / "seed0"
    (run / "csv").mkdir(parents=True)
    losses = [3.0, 2.0, 1.5, 2.5, 2.625, 1.0, 2.25, 0.5]
    rows = [f"{10 * i + 9},{v},,0" for i, v in enumerate(losses)] + ["79,,0.8,0"]
    (run / "csv" / "metrics.csv").write_text("step,train/loss_step,val/acc,epoch\n"
                                             + "\n".join(rows) + "\n")
    assert reproduce.loss_jumps(run) == 2
    assert reproduce.loss_jumps(run, jump=0.5) == 3  # 2.5 counts too
    assert reproduce.loss_jumps(tmp_path / "no_log") is None
    (run / "metrics.json").write_text(json.dumps({"test/acc": 0.9, "train/loss": 0.5}))
    config = reproduce.Config("resnet18/q8_bifurcated", "parity", "q8", ("quant=q8_bifurcated",))
    runs = reproduce.load(tmp_path, [config], [0, 1])
    assert runs[config.name][0]["jumps"] == 2
    assert "| 1 of 1 |" in reproduce.table([config], runs, "resnet18/fp32")[-1]
