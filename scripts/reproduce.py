"""Regenerate docs/RESULTS.md: does 8-bit training match fp32 on every timm family, and which
parts of the method matter.

    python scripts/reproduce.py --jobs 2            # Fashion-MNIST: 5 families x (fp32,
                                                    # q8_bifurcated), 7 ResNet-18 ablations,
                                                    # 8-bit gates on MobileNetV3, and
                                                    # EfficientNet-B0 at lr 0.03 with 8-bit
                                                    # gates or one quantizer in fp32, 3 seeds
                                                    # each (72 runs)
    python scripts/reproduce.py --suite digits      # parity on scikit-learn's digits, 4 families
    python scripts/reproduce.py --fast              # digits, fp32 vs q8_bifurcated, 1 seed (CI)
    python scripts/reproduce.py --only parity --seeds 0 1
    python scripts/reproduce.py --report-only       # rebuild the report from finished runs

Each (configuration, seed) is one `python train.py experiment=<suite's> ...` in a directory of
its own under --out, with one thread; --jobs runs that many at once. A run whose result exists
is not run again, so an interrupted reproduction continues where it stopped. The report comes
from the runs' metrics.json and CSV logs, the paper's numbers from scripts/paper_results.yaml.
Each run is tested with its final weights on the whole test set. A family reaches parity when
Welch's 95% interval of mean(q8) - mean(fp32) (scipy.stats.ttest_ind) lies above -0.5 points.
--fast exits 1 when |q8_bifurcated - fp32| exceeds --bound points. q8 is the installed package
(make setup).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # train.py's folder: each run starts there
PAPER = Path(__file__).with_name("paper_results.yaml")
# Every run: CSV logs (W&B is for interactive work), no per-layer statistics, one thread: a
# run's numbers and its time do not depend on how many cores the machine has.
COMMON = [
    "logger=csv", "callbacks.q8_stats.log_every_n_steps=0", "trainer.enable_progress_bar=false",
    "threads=1", "test_weights=final",
]

# A loss jump (nats): a logged batch loss this far above the lowest before it. The logged loss
# is one batch's mean (64 or 128 images), whose spread from batch to batch is about 0.1 here.
JUMP = 1.0


@dataclass(frozen=True)
class Config:
    name: str  # "<family>/<configuration>": its runs' directory under --out
    section: str
    what: str
    overrides: tuple[str, ...]

    @property
    def family(self) -> str:
        return self.name.split("/")[0]

    @property
    def quant(self) -> str:
        return self.name.split("/")[1]


@dataclass(frozen=True)
class Family:
    name: str
    recipe: str  # what differs from the suite's recipe
    overrides: tuple[str, ...]


TIMM = ("model=timm",)
# ConvNeXt and ViT (LayerNorm, no BN) train with their usual AdamW; the BN nets with SGD, the
# mobile nets at a lower lr. EfficientNet-B0 starts at a loss of 4-5 (its head's init is sized
# for 1,000 classes) and at lr 0.1 or 0.03 its loss jumps around the end of the warm-up, in fp32
# and in every 8-bit run at 0.03: which seeds jump decided its accuracy (docs/MOBILE_NETS.md).
ADAMW = "optimizer=adamw"
LOW_LR = "optimizer.lr=0.03"
FAMILIES = [
    Family("resnet18", "SGD", ("model=resnet18",)),
    Family("efficientnet_b0", "SGD, lr 0.01",
           (*TIMM, "model.name=efficientnet_b0", "optimizer.lr=0.01")),
    Family("mobilenetv3_small_100", "SGD, lr 0.03",
           (*TIMM, "model.name=mobilenetv3_small_100", LOW_LR)),
    Family("convnext_atto", "AdamW", (*TIMM, "model.name=convnext_atto", ADAMW)),
    Family("vit_tiny", "AdamW; 28x28, patch 4 (49 tokens); 2 epochs",
           (*TIMM, "model.name=vit_tiny_patch16_224", "+model.kwargs.img_size=28",
            "+model.kwargs.patch_size=4", "data.image_size=28", ADAMW, "trainer.max_epochs=2")),
]
# EfficientNet-B0 at lr 0.03, where its loss jumps: the sections that look for what 8 bits
# change there (gates, quantizers) train at this lr, against fp32 and the default at it too.
# Measured with one activation range per tensor, the default then.
EFF_LR003 = Family("efficientnet_b0_lr0.03", "SGD, lr 0.03; one activation range per tensor",
                   (*TIMM, "model.name=efficientnet_b0", LOW_LR, "quant.act_ranges=tensor"))
# digits, the data set not tuned on: each timm family keeps its Fashion-MNIST optimizer and lr
# and trains for the suite's epochs; digits_parity narrows ResNet-18 (model.kwargs), keys the
# timm models do not take. ViT is left out: 12 epochs cost it about 12 min a run.
NARROW = ("~model.kwargs.channels", "~model.kwargs.stem_width")
DIGITS_FAMILIES = [FAMILIES[0], *(Family(f.name, f.recipe, (*f.overrides, *NARROW))
                                  for f in FAMILIES[1:4])]
DEFAULT = ("fp32", "q8_bifurcated")  # the parity pair of every family
QUANT_WHAT = {
    "fp32": "full precision",
    "q8_bifurcated": "the default: 8-bit W, A, g_l at every GEMM, a range per channel at a "
                     "conv's input; 16-bit g_l copy for dL/dW; stochastic rounding; BN in full "
                     "precision, 8-bit saved input; squeeze-excitation gates in fp32",
}
ALL_BITS = "quant.weight_bits={b} quant.act_bits={b} quant.grad_bits={b}"
# The paper's ablations, on ResNet-18: each changes one thing against q8_bifurcated.
ABLATIONS = [
    ("q8_paper", "norm", "the paper's setting: Range BN on the 8-bit input, 8-bit g_l; one "
     "activation range per tensor",
     ("quant=q8_paper",)),
    ("q8_batchnorm", "norm", "standard BN on the 8-bit input, 8-bit g_l; one activation range "
     "per tensor",
     ("quant=q8_batchnorm",)),
    ("q8_no_bifurcation", "ablation", "dL/dW from the 8-bit g_l (no 16-bit copy)",
     ("quant=q8_no_bifurcation",)),
    ("q8_nearest_grads", "ablation", "round-to-nearest g_l instead of stochastic",
     ("quant=q8_nearest_grads",)),
    ("grads4", "bits", "g_l in 4 bits", ("quant=q8_bifurcated", "quant.grad_bits=4")),
    ("all6", "bits", "W, A and g_l in 6 bits", ("quant=q8_bifurcated",
                                               *ALL_BITS.format(b=6).split())),
    ("all4", "bits", "W, A and g_l in 4 bits", ("quant=q8_bifurcated",
                                               *ALL_BITS.format(b=4).split())),
]


# The default keeps squeeze-excitation gates in fp32 (docs/MOBILE_NETS.md); in 8 bits on the
# families that have them:
GATES8 = ("gates8", "gates", "squeeze-excitation gates in 8 bits, as every other layer",
          ("quant=q8_bifurcated", "quant.gates=8bit"))


# The default quantizes a convolution's input with one range per channel; the paper, with one
# per tensor (docs/MOBILE_NETS.md):
ACT_TENSOR = ("acttensor", "ranges", "one activation range per tensor (the paper), at every "
              "conv's input", ("quant=q8_bifurcated", "quant.act_ranges=tensor"))


# Which quantizer costs EfficientNet-B0 at lr 0.03 its accuracy: each puts one kind of tensor
# back in fp32.
ONE_IN_FP32 = [
    ("fp32_grads", "quantizers", "g_l in fp32 (both copies)",
     ("quant=q8_bifurcated", "quant.grad_bits=null", "quant.wgrad_bits=null")),
    ("fp32_acts", "quantizers", "activations in fp32",
     ("quant=q8_bifurcated", "quant.act_bits=null")),
    ("fp32_weights", "quantizers", "weights in fp32",
     ("quant=q8_bifurcated", "quant.weight_bits=null")),
]


def parity_configs(families: list[Family]) -> list[Config]:
    return [Config(f"{f.name}/{q}", "parity", QUANT_WHAT[q], (*f.overrides, f"quant={q}"))
            for f in families for q in DEFAULT]


def ablation_configs(family: Family, ablations: list[tuple] = ABLATIONS) -> list[Config]:
    return [Config(f"{family.name}/{name}", section, what, (*family.overrides, *overrides))
            for name, section, what, overrides in ablations]


@dataclass(frozen=True)
class Suite:
    title: str
    experiment: str
    configs: list[Config]
    families: list[Family]
    recipe: str
    target: float  # points: a family reaches parity when the interval lies above -target


SUITES = {
    "fashion_mnist": Suite(
        "Fashion-MNIST", "fashion_parity",
        parity_configs(FAMILIES) + ablation_configs(FAMILIES[0])
        + [c for f in FAMILIES[:4] for c in ablation_configs(f, [ACT_TENSOR])]
        + ablation_configs(FAMILIES[2], [GATES8]) + parity_configs([EFF_LR003])
        + ablation_configs(EFF_LR003, [GATES8, *ONE_IN_FP32]), FAMILIES,
        "Fashion-MNIST (`experiment=fashion_parity`): a stratified subset of 10,000 training "
        "images (1,000 more held out for validation), 32x32, batch 128, cosine schedule with a "
        "1-epoch warm-up, {epochs} epochs, random flips and shifts; SGD (momentum 0.9, lr 0.1) "
        "or AdamW (lr 1e-3) as the family's row says; timm's models at their full width. Test "
        "accuracy of the final weights on all 10,000 test images (one image is 0.01 points). "
        "A loss jump: a logged training loss (every 10 steps) more than "
        f"{JUMP:g} nat above the lowest logged before it.",
        0.5),
    "digits": Suite(
        "digits", "digits_parity", parity_configs(DIGITS_FAMILIES)
        + [c for f in DIGITS_FAMILIES for c in ablation_configs(f, [ACT_TENSOR])],
        DIGITS_FAMILIES,
        "scikit-learn's digits (`experiment=digits_parity`) at 32x32 (1,437 train / 360 test "
        "images, a fixed split), cosine schedule with a 1-epoch warm-up, {epochs} epochs, batch "
        "64, light augmentation; ResNet-18 at a quarter width (channels 16-32-64-128) with SGD "
        "(momentum 0.9, lr 0.1), the timm families at full width with their Fashion-MNIST "
        "optimizer and lr (not tuned on digits). Test accuracy of the final weights, on 360 "
        "images (one image is 0.28 points). A loss jump: a logged training loss (every 10 "
        f"steps) more than {JUMP:g} nat above the lowest logged before it.", 1.0),
}
SECTIONS = {
    "ranges": "Activation ranges: one per channel (the default) against one per tensor",
    "norm": "BatchNorm: the default against the paper's Range BN",
    "ablation": "Ablations of the method (8 bits)",
    "bits": "Fewer bits",
    "gates": "Squeeze-excitation gates: full precision (the default) against 8 bits",
    "quantizers": "One quantizer at a time in fp32",
}
# 5 epochs: at 3, the compressed cosine schedule ends while accuracy still climbs steeply, and
# one seed's q8 - fp32 gap ranged from -10.6 to +1.6 points over 4 seeds x 2 rounding-noise
# streams; at 5 epochs seed 0 gave -3.1 and seed 1 0.0. One seed's gap is noise either way:
# --fast shows that both runs train, not parity.
FAST = ["trainer.max_epochs=5"]
CONFIDENCE = 0.95
# the one line train.py prints when the nan guard stops a run (NonFiniteError, exit 1)
DIVERGED = re.compile(r"non-finite value at step (\d+)")


def run_dir(out: Path, config: Config, seed: int) -> Path:
    return out / config.name / f"seed{seed}"


def result_file(directory: Path) -> Path | None:
    """A run's result: its metrics.json, or diverged.json ({"seed", "step"}) for a run that
    diverged (a result too, at low bit widths); None while it has not finished."""
    return next((p for p in (directory / "metrics.json", directory / "diverged.json")
                 if p.is_file()), None)


def finished(directory: Path) -> bool:
    return result_file(directory) is not None


def train(out: Path, config: Config, seed: int, extra: list[str]) -> tuple[Path, float, str]:
    """One train.py run (skipped when finished before); returns dir, seconds, status. A run
    that the nan guard stopped leaves diverged.json with the step, instead of metrics.json."""
    directory = run_dir(out, config, seed)
    if finished(directory):
        return directory, 0.0, "done before"
    cmd = [sys.executable, "train.py", *COMMON, *config.overrides, f"seed={seed}", *extra,
           f"hydra.run.dir={directory}"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    start = time.time()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "train.log", "w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode == 0:
        return directory, time.time() - start, "ok"
    status = f"FAILED (exit {proc.returncode}, see train.log)"
    diverged = DIVERGED.search((directory / "train.log").read_text(errors="replace"))
    if diverged:
        step = int(diverged.group(1))
        (directory / "diverged.json").write_text(json.dumps({"seed": seed, "step": step}))
        status = f"diverged at step {step} (non-finite values, see train.log)"
    return directory, time.time() - start, status


def run_all(out: Path, configs: list[Config], seeds: list[int], extra: list[str],
            jobs: int = 1) -> float:
    """Every planned run, `jobs` at a time, a line each as it ends; seed-major, so that a
    reproduction cut short has every configuration's first seeds. Returns the wall-clock
    seconds."""
    tasks = [(c, s) for s in seeds for c in configs]
    start, done, lock = time.time(), [0], threading.Lock()

    def one(task: tuple[Config, int]) -> None:
        config, seed = task
        _, seconds, status = train(out, config, seed, extra)
        with lock:
            done[0] += 1
            print(f"[{done[0]}/{len(tasks)}] {config.name} seed {seed}: {status} "
                  f"({seconds:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, tasks))
    return time.time() - start


# ------------------------------------------------------------------------------- report
def loss_jumps(directory: Path, jump: float = JUMP) -> int | None:
    """How many logged training losses of a run lie more than `jump` above the lowest logged
    before them; None without a CSV log."""
    from q8.lit.run_history import read_history

    try:
        history = read_history(directory)
    except FileNotFoundError:
        return None
    if "train/loss_step" not in history:
        return None
    losses = history["train/loss_step"].dropna().tolist()
    lowest = itertools.accumulate(losses, min)
    return sum(loss > low + jump for loss, low in zip(losses[1:], lowest))


def load(out: Path, configs: list[Config], seeds: list[int]) -> dict[str, list[dict]]:
    """Each configuration's finished results (metrics.json or diverged.json) by name, with the
    run's loss jumps under "jumps"."""
    runs: dict[str, list[dict]] = {}
    for c in configs:
        for s in seeds:
            path = result_file(run_dir(out, c, s))
            if path is not None:
                result = json.loads(path.read_text())
                result["jumps"] = loss_jumps(path.parent)
                runs.setdefault(c.name, []).append(result)
    return runs


def jumped(rs: list[dict]) -> str:
    """How many of the runs had a loss jump."""
    counted = [r["jumps"] for r in rs if r.get("jumps") is not None]
    return f"{sum(j > 0 for j in counted)} of {len(counted)}" if counted else "n/a"


def acc(runs: list[dict]) -> list[float]:
    """Test accuracies in points, diverged runs left out."""
    return [100 * r["test/acc"] for r in runs if r.get("test/acc") is not None]


def mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def per_seed(rs: list[dict]) -> str:
    return ", ".join(f"{100 * r['test/acc']:.2f}" if r.get("test/acc") is not None
                     else f"diverged at step {r['step']}" if "step" in r else "n/a"
                     for r in rs) or "n/a"


def minutes(rs: list[dict]) -> str:
    values = [r["wall_time_s"] / 60 for r in rs if r.get("wall_time_s")]
    return f"{statistics.mean(values):.1f}" if values else "n/a"


def gap(runs: dict[str, list[dict]], a: str, b: str) -> float | None:
    x, y = acc(runs.get(a, [])), acc(runs.get(b, []))
    return statistics.mean(x) - statistics.mean(y) if x and y else None


def gap_interval(runs: dict[str, list[dict]], a: str, b: str,
                 level: float = CONFIDENCE) -> tuple[float, float] | None:
    """Welch's `level` confidence interval of mean(a) - mean(b) in points (the seeds' variances
    need not be equal); None with fewer than 2 seeds on either side."""
    from scipy.stats import ttest_ind

    x, y = acc(runs.get(a, [])), acc(runs.get(b, []))
    if len(x) < 2 or len(y) < 2:
        return None
    interval = ttest_ind(x, y, equal_var=False).confidence_interval(level)
    return float(interval.low), float(interval.high)


def span(interval: tuple[float, float] | None) -> str:
    return "n/a" if interval is None else f"[{interval[0]:+.2f}, {interval[1]:+.2f}]"


def verdict(interval: tuple[float, float] | None, target: float) -> str:
    """Parity when the whole interval lies above -target; **NO** when it lies below; otherwise
    the seeds cannot tell."""
    if interval is None:
        return "not resolved (one seed)"
    lo, hi = interval
    if lo > -target:
        return "**yes**"
    if hi < -target:
        return "**NO**"
    return "not resolved"


def parity_table(suite: Suite, runs: dict[str, list[dict]]) -> list[str]:
    """A row per family: fp32 and q8_bifurcated, their difference, its interval, the verdict."""
    lines = ["| family | recipe | fp32 test acc % | q8_bifurcated test acc % | q8 − fp32 "
             f"(points) | {CONFIDENCE:.0%} interval | above −{suite.target} | fp32 per seed | "
             "q8 per seed | runs with a loss jump (fp32, q8) | min/run (fp32, q8) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for f in suite.families:
        a, b = f"{f.name}/q8_bifurcated", f"{f.name}/fp32"
        if a not in runs and b not in runs:
            continue
        fp, q = runs.get(b, []), runs.get(a, [])
        d, interval = gap(runs, a, b), gap_interval(runs, a, b)
        diverged = sum("step" in r for r in q)
        q_mean = mean_std(acc(q)) + (f" ({diverged} of {len(q)} diverged)" if diverged else "")
        lines.append(f"| {f.name} | {f.recipe} | {mean_std(acc(fp))} | {q_mean} | "
                     f"{'n/a' if d is None else f'{d:+.2f}'} | {span(interval)} | "
                     f"{verdict(interval, suite.target)} | {per_seed(fp)} | {per_seed(q)} | "
                     f"{jumped(fp)}, {jumped(q)} | {minutes(fp)}, {minutes(q)} |")
    return lines


def table(configs: list[Config], runs: dict[str, list[dict]], reference: str) -> list[str]:
    """A row per configuration, against `reference`: the difference and its interval."""
    lines = [f"| configuration | what it changes | test acc % (mean ± std) | Δ vs `{reference}` "
             f"(points) | {CONFIDENCE:.0%} interval | per seed | final train loss | "
             "runs with a loss jump | min/run |", "|---|---|---|---|---|---|---|---|---|"]
    for c in configs:
        rs = runs.get(c.name, [])
        d = gap(runs, c.name, reference)
        losses = [r["train/loss"] for r in rs if r.get("train/loss") is not None]
        loss = f"{statistics.mean(losses):.3f}" if losses else "n/a"
        diverged = sum("step" in r for r in rs)
        mean = mean_std(acc(rs)) + (f" ({diverged} of {len(rs)} diverged)" if diverged else "")
        interval = None if c.name == reference else gap_interval(runs, c.name, reference)
        lines.append(f"| `{c.quant}` | {c.what} | {mean} | "
                     f"{'n/a' if d is None else f'{d:+.2f}'} | {span(interval)} | "
                     f"{per_seed(rs)} | {loss} | {jumped(rs)} | {minutes(rs)} |")
    return lines


def paper_table(path: Path = PAPER) -> list[str]:
    """The paper's numbers for the large-scale experiment configs, from `path`."""
    from omegaconf import OmegaConf

    paper = OmegaConf.to_container(OmegaConf.load(path))

    def approx(value: float | None) -> str:
        return "" if value is None else f"~{value:g}"

    lines = [paper["source"], "", "| experiment config | recipe | metric | paper: fp32 | "
             "paper: 8-bit | paper: fewer bits | note |", "|---|---|---|---|---|---|---|"]
    for row in paper["rows"]:
        bits = row["bits"]
        fewer = ", ".join(f"{approx(v)} at {b} bits" for b, v in bits.items() if b != 8)
        lines.append(f"| `experiment={row['experiment']}` | {row['recipe']} | {row['metric']} | "
                     f"{approx(row.get('fp32'))} | {approx(bits.get(8))} | {fewer} | "
                     f"{row.get('note', '')} |")
    return lines


def _pyplot():  # noqa: ANN202
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_parity(suite: Suite, runs: dict[str, list[dict]], path: Path,
                limits: tuple[float, float] = (-10.0, 5.0)) -> bool:
    """q8 - fp32 per family: each seed's q8 run against the fp32 mean (dots), the difference of
    means and its interval (bar, written out on the right; cut at `limits`), the -target
    line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 1.8 + 0.5 * len(suite.families)))
    drawn = []
    for f in suite.families:
        a, b = f"{f.name}/q8_bifurcated", f"{f.name}/fp32"
        d, interval = gap(runs, a, b), gap_interval(runs, a, b)
        if d is None:
            continue
        y = -len(drawn)
        fp = statistics.mean(acc(runs[b]))
        ax.plot([v - fp for v in acc(runs[a])], [y] * len(acc(runs[a])), ".", color="0.6")
        lo, hi = interval if interval else (d, d)
        ax.errorbar([d], [y], xerr=[[d - max(lo, limits[0])], [min(hi, limits[1]) - d]],
                    fmt="o", color="C0", capsize=4)
        ax.annotate(f"{d:+.2f} {span(interval)}", (1.01, y), xycoords=("axes fraction", "data"),
                    va="center", fontsize=8)
        drawn.append(f.name)
    if not drawn:
        plt.close(fig)
        return False
    ax.axvline(0, color="k", lw=1)
    ax.axvline(-suite.target, color="C3", ls="--", lw=1, label=f"−{suite.target} points")
    ax.set_xlim(*limits)
    ax.set_ylim(-len(drawn) + 0.5, 0.5)
    ax.set_yticks([-i for i in range(len(drawn))], drawn)
    ax.set(xlabel=f"q8 − fp32, test accuracy points (bar: {CONFIDENCE:.0%} interval, cut at "
                  f"{limits[0]:g} and {limits[1]:+g}; dots: seeds)",
           title=f"8 bits against fp32 ({suite.title})")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_bits(family: str, runs: dict[str, list[dict]], path: Path, title: str) -> bool:
    """Accuracy against bit width: g_l only, and W, A and g_l together."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for prefix, label in (("grads", "g_l only"), ("all", "W, A and g_l")):
        points = [(8, acc(runs.get(f"{family}/q8_bifurcated", [])))]
        points += [(b, acc(runs.get(f"{family}/{prefix}{b}", []))) for b in (6, 4, 2)]
        points = [(bits, a) for bits, a in points if a]
        if len(points) > 1:
            xs = [bits for bits, _ in points]
            ax.plot(xs, [statistics.mean(a) for _, a in points], "o-", label=label)
            ax.fill_between(xs, [min(a) for _, a in points], [max(a) for _, a in points],
                            alpha=0.2)
            drawn = True
    fp = acc(runs.get(f"{family}/fp32", []))
    if fp:
        ax.axhline(statistics.mean(fp), color="k", ls="--", lw=1, label="fp32")
    ax.set(xlabel="bits", ylabel="test accuracy % (mean; band: min-max over seeds)",
           title=f"{family}: accuracy against bit width ({title})", xticks=[2, 4, 6, 8])
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_curves(out: Path, seeds: list[int], names: list[str], path: Path, title: str) -> bool:
    """Validation accuracy by epoch, mean over seeds, from each run's CSV logs."""
    import pandas as pd

    from q8.lit.run_history import metrics_files, read_history

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for name in names:
        frames = []
        for s in seeds:
            directory = out / name / f"seed{s}"  # run_dir(out, config, s)
            if metrics_files(directory):
                df = read_history(directory)
                if "val/acc" in df and "epoch" in df:
                    frames.append(df.dropna(subset=["val/acc"]).groupby("epoch")["val/acc"]
                                  .last())
        if frames:
            curve = pd.concat(frames, axis=1).mean(axis=1) * 100
            ax.plot(curve.index + 1, curve.values, marker=".", label=name)
            drawn = True
    ax.set(xlabel="epoch", ylabel="validation accuracy % (mean over seeds)",
           title=f"Training curves ({title})")
    if drawn:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return (f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def report(out: Path, suite: Suite, configs: list[Config], seeds: list[int], command: str,
           wall_s: float | None, results: Path) -> str:
    """Write the Markdown report of the finished runs to `results`, its figures beside it in
    results/<suite>_*.png."""
    runs = load(out, configs, seeds)
    figures = results.parent / "results"
    figures.mkdir(parents=True, exist_ok=True)
    stem = suite.experiment
    n_runs = sum(len(v) for v in runs.values())
    run_minutes = sum(r.get("wall_time_s", 0) for v in runs.values() for r in v) / 60
    epochs = sorted({r["epochs"] for v in runs.values() for r in v if "epochs" in r})
    lines = [
        f"# Results: 8-bit training against fp32 on {suite.title}",
        "",
        "Generated by `scripts/reproduce.py`; every number below comes from the runs it made.",
        "",
        f"- Command: `{command}`",
        f"- Machine: {machine()}",
        f"- Runs: {n_runs} (seeds {', '.join(map(str, seeds))}), {run_minutes:.0f} min of "
        "training in total" + (f", {wall_s / 60:.0f} min wall clock" if wall_s else "") + ".",
        "- Recipe: " + suite.recipe.format(epochs=" or ".join(map(str, epochs)) or "n/a"),
        f"- Parity: Welch's {CONFIDENCE:.0%} interval of mean(q8_bifurcated) − mean(fp32) lies "
        f"above −{suite.target} points.",
        "",
        "## Parity: fp32 against 8-bit training, per family",
        "",
        *parity_table(suite, runs),
        "",
    ]
    if plot_parity(suite, runs, figures / f"{stem}_parity.png"):
        lines += [f"![q8 - fp32 per family](results/{stem}_parity.png)", ""]
    for section, title in SECTIONS.items():
        members = [c for c in configs if c.section == section and c.name in runs]
        for family in dict.fromkeys(c.family for c in members):  # a table per family
            reference = f"{family}/q8_bifurcated"
            rows = [c for c in configs if c.name in (f"{family}/fp32", reference)]
            lines += [f"## {title} ({family})", "",
                      *table(rows + [c for c in members if c.family == family], runs,
                             reference), ""]
            if section == "bits" and plot_bits(family, runs, figures / f"{stem}_bits.png",
                                               suite.title):
                lines += [f"![accuracy against bits](results/{stem}_bits.png)", ""]
    missing = [c.name for c in configs if c.name not in runs]
    if missing:
        lines += ["Configurations with no finished run (not in the tables): "
                  + ", ".join(f"`{m}`" for m in missing) + ".", ""]
    family = suite.families[0].name
    names = [c.name for c in configs if c.family == family and c.section != "bits"]
    if plot_curves(out, seeds, names, figures / f"{stem}_curves.png", suite.title):
        lines += [f"## Training curves ({family})", "",
                  f"![validation accuracy](results/{stem}_curves.png)", ""]
    lines += ["The Range BN estimator on its own (E[sigma_hat]/sigma for n = 8 .. 10^6 under the "
              "three scale rules, and its tolerance to 8-bit input against BN's) is in "
              "[RANGE_BN.md](RANGE_BN.md), written by `scripts/range_bn_table.py`.", ""]
    lines += ["## The paper's numbers, for the large-scale configs", "", *paper_table(), ""]
    text = "\n".join(lines)
    results.write_text(text)
    return text


# Each training invocation appends its command and wall clock here, so that a report made
# from several invocations (more seeds later, one section at a time) names them all.
INVOCATIONS = "invocations.jsonl"


def record_invocation(out: Path, command: str, wall_s: float) -> None:
    with open(out / INVOCATIONS, "a") as f:
        f.write(json.dumps({"command": command, "wall_s": round(wall_s)}) + "\n")


def invocations(out: Path) -> tuple[str, float | None]:
    """The commands that made the runs under `out`, joined by "; ", and their wall clock
    summed (None when none was recorded)."""
    path = out / INVOCATIONS
    if not path.is_file():
        return "python scripts/reproduce.py", None
    done = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return "; ".join(d["command"] for d in done), sum(d["wall_s"] for d in done)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=list(SUITES), default="fashion_mnist",
                   help="the data set and its configurations (--fast: digits)")
    p.add_argument("--out", type=Path, help="run directories go here (one per configuration "
                   "and seed); default outputs/reproduce/<suite>")
    p.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--fast: 0)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one thread each")
    p.add_argument("--only", nargs="+", metavar="NAME",
                   help="sections (parity, " + ", ".join(SECTIONS) + "), families or "
                        "configurations (resnet18/q8_paper)")
    p.add_argument("--fast", action="store_true",
                   help="digits: fp32 and q8_bifurcated, seed 0, 5 epochs; check --bound")
    # One run's test accuracy on 360 images at p ~ 0.95 has a binomial std of 1.15 points;
    # the difference of two runs 1.6 points; 5 points is about 3 standard deviations.
    p.add_argument("--bound", type=float, default=5.0,
                   help="--fast: largest allowed |q8_bifurcated - fp32| in points")
    p.add_argument("--results", type=Path,
                   help="the report to write; default docs/RESULTS.md for fashion_mnist, "
                        "docs/RESULTS_<suite>.md for another, <out>/RESULTS.md with --fast")
    p.add_argument("--report-only", action="store_true", help="no training, only the report")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)

    suite = SUITES["digits" if args.fast else args.suite]
    name = "digits" if args.fast else args.suite
    out = args.out or ROOT / "outputs" / "reproduce" / name
    configs, extra = suite.configs, [f"experiment={suite.experiment}"]
    seeds = args.seeds or ([0] if args.fast else [0, 1, 2])
    if args.fast:  # the first family's parity pair only, at FAST's epochs
        configs = [c for c in configs
                   if c.family == suite.families[0].name and c.section == "parity"]
        extra += FAST
    results = args.results or (out / "RESULTS.md" if args.fast else ROOT / "docs" / (
        "RESULTS.md" if name == "fashion_mnist" else f"RESULTS_{name}.md"))
    if args.only:
        known = {"parity", *SECTIONS, *(c.name for c in configs), *(c.family for c in configs)}
        unknown = set(args.only) - known
        if unknown:
            p.error(f"unknown --only {', '.join(sorted(unknown))}: valid are "
                    f"{', '.join(sorted(known))}")
        configs = [c for c in configs if {c.name, c.section, c.family} & set(args.only)]

    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        wall_s = run_all(out, configs, seeds, extra, args.jobs)
        record_invocation(out, " ".join(["python scripts/reproduce.py", *argv]), wall_s)
    command, wall = invocations(out)
    results.parent.mkdir(parents=True, exist_ok=True)
    report(out, suite, configs, seeds, command, wall, results)
    print(f"report written to {results}")

    missing = [f"{c.name}/seed{s}" for c in configs for s in seeds
               if not finished(run_dir(out, c, s))]
    if missing:
        print(f"error: {len(missing)} runs did not finish: {', '.join(missing)}",
              file=sys.stderr)
        return 1
    if args.fast:
        parity = gap(load(out, configs, seeds), "resnet18/q8_bifurcated", "resnet18/fp32")
        if parity is not None:
            print(f"parity: q8_bifurcated - fp32 = {parity:+.2f} points (bound ±{args.bound})")
            if abs(parity) > args.bound:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
