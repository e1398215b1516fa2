"""Loss curves of q8 in each GEMM mode (QuantConfig.gemm), the same seeded runs side by side.

    python scripts/gemm_curves.py --device cuda --steps 300 --seeds 0,1,2 --out curves/

Each (mode, seed) run trains the same timm model on the app's digits training split
(q8.lit.data.DigitsDataModule, without augmentation; the same batches for every mode of a seed)
with SGD for --steps steps, and records the loss of every step. A mode agrees with
`dequantized` when, in every window of --window steps, the difference of the seed means is
within twice the seed standard deviation of the dequantized runs (the spread that the seed
alone puts there). Writes curves.csv, curves.png and verdict.json under --out, and prints the
verdict per mode. q8 is the installed package (make setup: pip install -e .).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import q8
from q8.gemm import MODES


def digits(image_size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits training split as one (N, 1, S, S) tensor of normalised images and one of
    labels."""
    from torch.utils.data import DataLoader

    from q8.lit.data import DigitsDataModule

    data = DigitsDataModule(image_size=image_size, augment=False)
    data.setup("fit")
    x, y = next(iter(DataLoader(data.train_set, batch_size=len(data.train_set))))
    return x.to(device), y.to(device)


def run(mode: str, seed: int, args: argparse.Namespace, data: tuple) -> list[float]:
    import timm

    x, y = data
    torch.manual_seed(seed)
    model = timm.create_model(args.model, num_classes=10, in_chans=1)
    model = q8.quantize_model(model, q8.QuantConfig(gemm=mode)).to(args.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    order = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(args.steps):
        idx = torch.randint(0, len(x), (args.batch,), generator=order).to(args.device)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(v) for v in torch.stack(losses).cpu()]


def windows(curve: list[float], size: int) -> list[float]:
    return [statistics.fmean(curve[i : i + size]) for i in range(0, len(curve), size)]


def verdicts(curves: dict[str, dict[int, list[float]]], size: int) -> dict[str, dict]:
    """Per mode: the largest window difference of seed means against dequantized, and the
    bound (twice the dequantized runs' seed standard deviation in that window)."""
    base = [windows(c, size) for c in curves["dequantized"].values()]
    out = {}
    for mode, runs in curves.items():
        if mode == "dequantized":
            continue
        mine = [windows(c, size) for c in runs.values()]
        rows = []
        for w in range(len(base[0])):
            b = [r[w] for r in base]
            spread = statistics.stdev(b)
            diff = statistics.fmean(r[w] for r in mine) - statistics.fmean(b)
            rows.append((abs(diff), 2 * spread))
        out[mode] = {"agrees": all(d <= bound for d, bound in rows),
                     "max_diff": max(d for d, _ in rows),
                     "bounds": [bound for _, bound in rows],
                     "diffs": [d for d, _ in rows]}
    return out


def plot(curves: dict[str, dict[int, list[float]]], size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, runs in curves.items():
        per = [windows(c, size) for c in runs.values()]
        mean = [statistics.fmean(v) for v in zip(*per)]
        spread = [statistics.stdev(v) for v in zip(*per)]
        steps = [size * (i + 0.5) for i in range(len(mean))]
        ax.plot(steps, mean, label=f"{mode} ({len(per)} seeds)")
        ax.fill_between(steps, [m - s for m, s in zip(mean, spread)],
                        [m + s for m, s in zip(mean, spread)], alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {size}-step windows, ± seed sd)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=25)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="outputs/gemm_curves")
    args = p.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if "dequantized" not in modes:
        modes.insert(0, "dequantized")
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2:
        p.error("--seeds: at least two, the bound is their spread")
    data = digits(args.image_size, args.device)
    curves: dict[str, dict[int, list[float]]] = {m: {} for m in modes}
    total = len(modes) * len(seeds)
    for i, (mode, seed) in enumerate((m, s) for m in modes for s in seeds):
        print(f"\r[{i + 1}/{total}] {mode} seed {seed}", end="", flush=True, file=sys.stderr)
        curves[mode][seed] = run(mode, seed, args, data)
    print(file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "curves.csv", "w") as f:
        f.write("mode,seed,step,loss\n")
        for mode, runs in curves.items():
            for seed, curve in runs.items():
                f.writelines(f"{mode},{seed},{t},{v:.6g}\n" for t, v in enumerate(curve))
    plot(curves, args.window, out / "curves.png")
    result = {"args": vars(args), "verdicts": verdicts(curves, args.window)}
    (out / "verdict.json").write_text(json.dumps(result, indent=2))
    for mode, v in result["verdicts"].items():
        print(f"{mode}: {'agrees with' if v['agrees'] else 'DIFFERS from'} dequantized "
              f"(largest window difference {v['max_diff']:.4f}; bound: 2 seed sd)")
    return result


if __name__ == "__main__":
    main()
