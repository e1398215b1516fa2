"""The share of each timm family's GEMM FLOPs that q8 runs in 8 bits, measured at native size.

    python scripts/coverage_table.py                       # the families below -> docs/COVERAGE.md
    python scripts/coverage_table.py --models resnet18,vit_tiny_patch16_224 --out /tmp/c.md

It also rewrites the model table of README.md, between its `coverage:begin` and `coverage:end`
markers (`--readme ''` leaves the README alone).

For each model: quantize_model with the default QuantConfig, then q8.coverage on one training
step of a batch of 2 random images at the model's own input size (timm's pretrained_cfg), and
the modules quantize_model left in full precision (q8_report.kept), counted by class.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import timm
import torch

import q8

MODELS = ("resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto",
          "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
          "beit_base_patch16_224", "eva02_tiny_patch14_224", "levit_128s", "mobilevit_xxs",
          "resnetv2_50x1_bit", "ecaresnet26t", "cait_xxs24_224", "poolformer_s12")


def measure(name: str, batch: int) -> dict:
    """One model's row: its input size, the quantized shares and what stayed full precision."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    size = model.pretrained_cfg["input_size"]
    q8.quantize_model(model, q8.QuantConfig())
    start = time.perf_counter()
    report = q8.coverage(model, torch.randn(batch, *size))
    full = Counter()
    for g in report.full_precision():
        full[g.module_class] += g.flops
    total = sum(g.flops for g in report.gemms)
    return {
        "model": name, "input": "x".join(map(str, size[1:])),
        "forward": report.share("forward"), "backward": report.share("backward"),
        "full_precision": ", ".join(f"{cls} {100 * f / total:.1f}%"
                                    for cls, f in full.most_common(3)),
        "kept": ", ".join(f"{n} {cls}" for (cls, _), n in sorted(
            Counter((c, r) for _, c, r in model.q8_report.kept).items())),
        "seconds": time.perf_counter() - start,
    }


def table(rows: list[dict]) -> str:
    lines = ["| model | input | forward | backward | largest full-precision GEMMs "
             "(share of all FLOPs) | modules left in full precision |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['input']} | {100 * r['forward']:.1f}% | "
              f"{100 * r['backward']:.1f}% | {r['full_precision'] or '-'} | {r['kept'] or '-'} |"
              for r in rows]
    return "\n".join(lines)


BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def readme_table(rows: list[dict]) -> str:
    """The README's short table: each model's forward and backward share in 8 bits."""
    lines = ["| model | input | GEMM FLOPs in 8 bits, forward / backward |", "|---|---|---|"]
    lines += [f"| {r['model']} | {r['input']} | {100 * r['forward']:.1f}% / "
              f"{100 * r['backward']:.1f}% |" for r in rows]
    return "\n".join(lines)


def write_between_markers(path: Path, body: str) -> None:
    """Replace what lies between the BEGIN and END markers of `path` with `body`."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block to write the table into")
    head, rest = text.split(BEGIN, 1)
    path.write_text(f"{head}{BEGIN}\n{body}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch", type=int, default=2)
    root = Path(__file__).resolve().parents[1]
    p.add_argument("--out", default=str(root / "docs" / "COVERAGE.md"))
    p.add_argument("--readme", default=str(root / "README.md"),
                   help="the README whose model table to rewrite ('' for none)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}", end="", flush=True, file=sys.stderr)
        rows.append(measure(name, args.batch))
        print(f": {100 * rows[-1]['forward']:.1f}% / {100 * rows[-1]['backward']:.1f}% "
              f"({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
    text = (
        "# What q8 runs in 8 bits, family by family\n\n"
        "Made by `scripts/coverage_table.py`: for each timm model, `quantize_model` with the\n"
        "default `QuantConfig`, then `q8.coverage` on one training step of "
        f"{args.batch} random images\nat the model's native input size. *forward* and "
        "*backward*: the share of that pass's GEMM\nFLOPs (convolutions, matrix products, "
        "attention) whose operands were on q8's grid.\nThe last columns: the classes of the "
        "GEMMs that ran in full precision, with their share of\nall the step's FLOPs, and the "
        "modules with parameters that `quantize_model` left alone: the branch of each\n"
        "squeeze-excitation gate (convolutions on pooled features, in full precision by the\n"
        "default `gates=\"float\"`, docs/MOBILE_NETS.md), and holders of elementwise parameters\n"
        "(layer scales, class tokens, position embeddings, which enter no GEMM).\n\n"
        f"torch {torch.__version__}, timm {timm.__version__}.\n\n{table(rows)}\n")
    Path(args.out).write_text(text)
    if args.readme:
        write_between_markers(Path(args.readme), readme_table(rows))
    print(table(rows))
    print(f"wrote {args.out}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
