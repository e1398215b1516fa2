"""Can a quantized model fit one fixed batch? The loss after a few SGD steps, per variant.

    python scripts/fixed_batch.py --models efficientnet_b0 --variants fp32,q8,q8_std_bn
    python scripts/fixed_batch.py --models mobilenetv2_050 --seeds 0,1,2 --out /tmp/fb.md

Each run: a timm model at 32x32 (10 classes), one fixed batch of 48 random images and labels
(the same for every run), SGD with momentum 0.9 and lr 0.01 for 20 steps; the loss after the last
step. fp32 reaches a small loss; a variant that stays near ln(10) = 2.3 or above does not train,
and a NaN run is named where it first went non-finite (q8.check_finite). The variants isolate
one quantizer each (see VARIANTS). One thread by default (--threads): a run's loss changes with
the order of floating-point sums, so only the same thread count (and CPU) gives the same
numbers, and the seeds' spread is the noise to judge a difference by.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import q8
from q8.functional import GradSpec
from q8.layers import QuantActivationMixin
from q8.norm import QuantNormMixin


def per_channel_norm_input(model: nn.Module) -> None:
    """Every BN twin takes its input quantized with one range per channel (fake-quantized
    ahead of it) instead of the twin's one range per tensor."""
    for m in model.modules():
        if isinstance(m, QuantNormMixin):
            m.q8_config = dataclasses.replace(m.q8_config, act_bits=None)
            m.register_forward_pre_hook(lambda m, a: (q8.fake_quantize(a[0], 8, dim=1),))


def per_channel_norm(model: nn.Module) -> None:
    """per_channel_norm_input, and the BN twins' output gradient g_l quantized (8 bits,
    stochastic) with one range per channel too, ahead of their backward."""
    per_channel_norm_input(model)
    for m in model.modules():
        if isinstance(m, QuantNormMixin):
            bits = m.q8_grad.bits
            m.q8_grad = GradSpec(None, None)
            m.register_full_backward_pre_hook(
                lambda m, g, bits=bits: (q8.fake_quantize(g[0], bits, "stochastic", dim=1),))


def norm_float_grad(model: nn.Module) -> None:
    """BN twins keep their 8-bit input but take g_l in fp32 (the conv before them quantizes it)."""
    for m in model.modules():
        if isinstance(m, QuantNormMixin):
            m.q8_grad = GradSpec(None, None)


def norm_float_input(model: nn.Module) -> None:
    """BN twins normalise their fp32 input; g_l stays 8-bit."""
    for m in model.modules():
        if isinstance(m, QuantNormMixin):
            m.q8_config = dataclasses.replace(m.q8_config, act_bits=None)


def norm_float(model: nn.Module) -> None:
    """BN twins on their fp32 input and g_l (what bn_compute="float" does, without the 8-bit
    saved input)."""
    norm_float_grad(model)
    norm_float_input(model)


def float_activations(model: nn.Module) -> None:
    """Activation twins back to their float classes: backward keeps their fp32 input."""
    for m in model.modules():
        if isinstance(m, QuantActivationMixin):
            m.__class__ = next(c for c in type(m).__mro__ if not c.__module__.startswith("q8"))


SMALL_INPUT = {"vit": {"img_size": 32, "patch_size": 8}}  # a family's arguments at 32x32

Variant = tuple[q8.QuantConfig | None, Callable[[nn.Module], None] | None]


def paper(**change: object) -> q8.QuantConfig:
    """The paper's setting (conf/quant/q8_paper.yaml) with `change` applied."""
    return q8.QuantConfig(**{"bn": "range", "bn_compute": "8bit", "gates": "8bit",
                             "act_ranges": "tensor", **change})


# Each study variant changes one thing against the paper's setting (q8_paper).
STD_BN = {"bn": "batchnorm"}  # standard BN, still on the 8-bit input and g_l
FP32 = {"weight_bits": None, "act_bits": None, "grad_bits": None, "wgrad_bits": None}
VARIANTS: dict[str, Variant] = {
    "fp32": (None, None),
    "q8": (q8.QuantConfig(), None),  # the default: q8_bifurcated
    "q8_paper": (paper(), None),
    "q8_no_act": (paper(act_bits=None), None),  # activations in fp32
    "q8_no_weight": (paper(weight_bits=None), None),  # weights in fp32
    "q8_fp32_grads": (paper(grad_bits=None, wgrad_bits=None), None),
    "q8_per_channel_w": (paper(per_channel_weights=True), None),
    "q8_std_bn": (paper(**STD_BN), None),
    "q8_skip_bn": (paper(skip=["*bn*"]), None),  # every BN left in fp32
    "q8_skip_se": (paper(skip=["*.se.*"]), None),
    "q8_skip_dw": (paper(skip=["*conv_dw"]), None),
    "q8_skip_ends": (paper(skip=["conv_stem", "conv_head", "classifier"]), None),
    "q8_bn_input_per_channel": (paper(), per_channel_norm_input),
    "q8_std_bn_input_per_channel": (paper(**STD_BN), per_channel_norm_input),
    "q8_float_act_saves": (paper(), float_activations),
    "q8_bn_per_channel": (paper(), per_channel_norm),  # BN input and g_l
    "q8_std_bn_per_channel": (paper(**STD_BN), per_channel_norm),
    "q8_bn_float_g": (paper(), norm_float_grad),
    "q8_bn_float_in": (paper(), norm_float_input),
    "q8_bn_float": (paper(), norm_float),
    "q8_std_bn_float_in": (paper(**STD_BN), norm_float_input),
    "q8_std_bn_float_g": (paper(**STD_BN), norm_float_grad),
    "q8_std_bn_float": (paper(**STD_BN), norm_float),
    "fp32_range_bn": (paper(**FP32), None),  # Range BN, nothing quantized
    # against the default
    "q8_default_per_channel_w": (q8.QuantConfig(per_channel_weights=True), None),
    "q8_default_no_act": (q8.QuantConfig(act_bits=None), None),
    "q8_default_fp32_grads": (q8.QuantConfig(grad_bits=None, wgrad_bits=None), None),
    "q8_default_float_act_saves": (q8.QuantConfig(), float_activations),
    "q8_default_gates8": (q8.QuantConfig(gates="8bit"), None),
    "q8_default_skip_dw": (q8.QuantConfig(skip=["*conv_dw"]), None),
}


def run(name: str, variant: Variant, seed: int, steps: int) -> tuple[float, str | None]:
    """The loss after `steps` steps, and where the model first went non-finite (or None)."""
    config, change = variant
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10, **SMALL_INPUT.get(name.split("_")[0], {}))
    if config is not None:
        q8.quantize_model(model, config)
    if change is not None:
        change(model)
    model.train()
    data = torch.Generator().manual_seed(100)
    x = torch.randn(48, 3, 32, 32, generator=data)
    y = torch.randint(0, 10, (48,), generator=data)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item(), q8.health.find_non_finite(model)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--models", default="efficientnet_b0")
    p.add_argument("--variants", default="fp32,q8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default="", help="also write the Markdown table here")
    # 20 steps of 8-bit rounding amplify the order of a sum's terms: one run's loss depends on
    # the thread count (EfficientNet-B0, q8_default_gates8, seed 0: 0.059 on one thread, 0.191
    # on two), so runs pin it.
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--act-ranges", choices=["variant", "channel", "tensor"], default="variant",
                   help="a conv input's ranges in every quantized variant (QuantConfig."
                        "act_ranges; docs/MOBILE_NETS.md's fixed-batch tables: tensor)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}: valid are {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for model in args.models.split(","):
        for v in args.variants.split(","):
            losses, where = [], []
            for seed in seeds:
                start = time.perf_counter()
                config, change = VARIANTS[v]
                if config is not None and args.act_ranges != "variant":
                    config = dataclasses.replace(config, act_ranges=args.act_ranges)
                loss, bad = run(model, (config, change), seed, args.steps)
                losses.append(loss)
                where += [bad] if bad else []
                print(f"{model} {v} seed {seed}: {loss:.4f} ({time.perf_counter() - start:.0f} s)"
                      + (f", non-finite first at {bad}" if bad else ""), file=sys.stderr)
            rows.append({"model": model, "variant": v, "losses": losses, "non_finite": where})
    lines = ["| model | variant | loss per seed | median | first non-finite |",
             "|---|---|---|---|---|"]
    for r in rows:
        med = statistics.median(r["losses"])
        lines.append(f"| {r['model']} | {r['variant']} | "
                     f"{', '.join(f'{v:.3f}' for v in r['losses'])} | {med:.3f} | "
                     f"{'; '.join(r['non_finite']) or '-'} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return rows


if __name__ == "__main__":
    main()
