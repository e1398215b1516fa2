"""How close q8's attention gradients are to fp32's: SQNR of dQ, dK, dV and d(bias), in dB.

    python scripts/attention_sqnr.py       # ViT-Tiny's shapes: 3 heads of 64, 197 tokens

One attention call of random Q, K, V (unit variance), a small position bias and a random output
gradient g; the gradients of q8's attention (q8.attention) against fp32 autograd through
F.scaled_dot_product_attention, for each way of quantizing it (ROWS). SQNR = 10 log10(|ref|^2 /
|q8 - ref|^2), averaged over --trials draws of the rounding noise.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from q8.attention import ProductSpec, attention
from q8.functional import GradSpec
from q8.kernels import Kernels
from q8.kernels.reference import draw_seed, fake_quant, minmax

ROWS = {
    "q8 (8-bit Q, K, V, P; 8-bit g and dS; 16-bit dS for the bias)":
        ProductSpec(8, GradSpec(8, 16)),
    "8-bit gradients only (fp32 forward)": ProductSpec(None, GradSpec(8, 16)),
    "8-bit forward only (fp32 gradients)": ProductSpec(8, GradSpec(None, None)),
    "16-bit gradients (8-bit forward)": ProductSpec(8, GradSpec(16, 16)),
}


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum() / (approx - ref).pow(2).sum())


def grads(fn, inputs: list[torch.Tensor], g: torch.Tensor) -> list[torch.Tensor]:  # noqa: ANN001
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    fn(*leaves).backward(g)
    return [t.grad for t in leaves]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v, g = (torch.randn(shape) for _ in range(4))
    bias = 0.1 * torch.randn(1, args.heads, args.tokens, args.tokens)
    inputs = [q, k, v, bias]
    ref = grads(lambda q, k, v, b: F.scaled_dot_product_attention(q, k, v, attn_mask=b),
                inputs, g)
    kernels = Kernels("auto")
    results = {}
    print("| quantized | dQ | dK | dV | d(bias) |\n|---|---|---|---|---|")
    for label, spec in ROWS.items():
        dbs = [0.0] * 4
        for _ in range(args.trials):
            got = grads(lambda q, k, v, b, s=spec: attention(q, k, v, b, spec=s, kernels=kernels),
                        inputs, g)
            dbs = [d + sqnr_db(r, x) / args.trials for d, r, x in zip(dbs, ref, got)]
        results[label] = dbs
        print(f"| {label} | " + " | ".join(f"{d:.1f} dB" for d in dbs) + " |")
    results["P, dS per tensor / per row"] = ranges(q, k, v, g)
    return results


def ranges(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> list[float]:
    """SQNR of P (nearest) and of dS (stochastic) at 8 bits, one range per tensor against one
    per row: the reason q8 quantizes them per row."""
    p = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), -1)
    dp = g @ v.mT
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    out = []
    print("\n| 8 bits | per tensor | per row |\n|---|---|---|")
    for name, t, seed in (("P", p, None), ("dS", ds, draw_seed())):
        tensor = fake_quant(t, *minmax(t), 8, seed)
        row = fake_quant(t, t.amin(-1, keepdim=True), t.amax(-1, keepdim=True), 8, seed)
        out += [sqnr_db(t, tensor), sqnr_db(t, row)]
        print(f"| {name} | {out[-2]:.1f} dB | {out[-1]:.1f} dB |")
    return out


if __name__ == "__main__":
    main()
