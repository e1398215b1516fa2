"""Which activation quantizer costs EfficientNet-B0 its accuracy? train.py with one changed.

    python scripts/act_screen.py dw_fp32 model=timm model.name=efficientnet_b0 \
        optimizer.lr=0.03 quant=q8_bifurcated experiment=fashion_parity seed=0

`act_bits` quantizes several tensors at once: the inputs of the convolutions (forward), and
what the activation twins and BatchNorm keep for backward. Putting all of them back in fp32
(`quant.act_bits=null`) recovers fp32's accuracy on EfficientNet-B0 (docs/MOBILE_NETS.md); each
mode here changes one of them, for one run, by patching q8's twins before train.py builds the
model. They are probes for a study, not options of QuantConfig:

- dw_fp32: depthwise convolutions take their input in fp32;
- dw_16bit: ... in 16 bits;
- dw_per_channel: ... in 8 bits with one range per channel;
- dense_fp32: every other convolution and linear layer takes its input in fp32;
- act_saves_fp32: SiLU, Sigmoid, ... compute their backward on x, not on 8-bit x_hat;
- bn_saves_fp32: BatchNorm computes its backward on the exact x_tilde, not on 8-bit codes;
- saves_bf16: both keep bf16 (two bytes, 8 significant bits at every magnitude) instead of
  8-bit codes on one fixed grid; saves_fp32: both keep fp32.

    python scripts/act_screen.py --gradients

trains nothing: it prints how far each probe's gradient (one EfficientNet-B0 step, g_l in fp32
so that only the saves differ) lies from the gradient with both saves in fp32.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

import q8
import q8.norm
from q8.functional import ACTIVATIONS
from q8.layers import QuantActivationMixin, QuantLayerMixin

ROOT = Path(__file__).resolve().parents[1]
CHILD = "Q8_ACT_SCREEN"  # set in the process that runs train.py: the probe it runs
INPUTS = ("dw_fp32", "dw_16bit", "dw_per_channel", "dense_fp32")  # a layer's input changes
MODES = (*INPUTS, "act_saves_fp32", "bn_saves_fp32", "saves_bf16", "saves_fp32")


class _Bf16SavesFn(torch.autograd.Function):
    """y = f(x); backward g f'(x) with x kept in bf16."""

    @staticmethod
    def forward(ctx, x, kind: str):  # noqa: ANN001, ANN205
        ctx.kind = kind
        ctx.save_for_backward(x.detach().to(torch.bfloat16))
        return ACTIVATIONS[kind][0](x, False)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return ACTIVATIONS[ctx.kind][1](g, x.float()), None


def _depthwise(spec: q8.functional.LayerSpec, x: torch.Tensor) -> bool:
    return spec.groups > 1 and spec.groups == x.shape[1]


@contextlib.contextmanager
def probe(mode: str) -> Iterator[None]:
    """q8's twins with `mode`'s change, inside the block."""
    if mode not in MODES:
        raise SystemExit(f"unknown mode {mode!r}: valid are {', '.join(MODES)}")
    with contextlib.ExitStack() as stack:
        if mode in INPUTS:
            apply = QuantLayerMixin._q8_apply

            def changed(self, x, weight, bias, spec):  # noqa: ANN001, ANN202
                dw = _depthwise(spec, x)
                if mode == ("dw_fp32" if dw else "dense_fp32"):
                    spec = dataclasses.replace(spec, act_bits=None)
                elif mode == "dw_16bit" and dw:
                    spec = dataclasses.replace(spec, act_bits=16)
                elif mode == "dw_per_channel" and dw:
                    x = q8.fake_quantize(x, 8, dim=1)
                    spec = dataclasses.replace(spec, act_bits=None)
                return apply(self, x, weight, bias, spec)

            stack.enter_context(mock.patch.object(QuantLayerMixin, "_q8_apply", changed))
        if mode in ("act_saves_fp32", "saves_fp32"):
            setup = QuantActivationMixin._q8_setup

            def float_saves(self, config, kernels):  # noqa: ANN001, ANN202
                setup(self, config, kernels)
                self.q8_bits = None

            stack.enter_context(mock.patch.object(QuantActivationMixin, "_q8_setup",
                                                  float_saves))
        if mode in ("bn_saves_fp32", "saves_bf16", "saves_fp32"):  # restored: codes * 1 + 0
            dtype = torch.bfloat16 if mode == "saves_bf16" else torch.float32
            stack.enter_context(mock.patch.object(
                q8.norm, "channel_codes",
                lambda x, bits: (x.to(dtype), torch.ones(()), torch.zeros(()))))
        if mode == "saves_bf16":
            def bf16_saves(self, x):  # noqa: ANN001, ANN202
                if not (torch.is_grad_enabled() and x.requires_grad):
                    return super(QuantActivationMixin, self).forward(x)
                return _Bf16SavesFn.apply(x, self.q8_kind)

            stack.enter_context(mock.patch.object(QuantActivationMixin, "forward", bf16_saves))
        yield


def step_gradient(mode: str | None, model: str = "efficientnet_b0") -> torch.Tensor:
    """All parameter gradients of one training step (batch 32 at 32x32, seed 0) with g_l in
    fp32, under probe `mode` (None: the default's saves)."""
    import timm

    torch.manual_seed(0)
    net = timm.create_model(model, num_classes=10)
    with probe(mode) if mode else contextlib.nullcontext():
        q8.quantize_model(net, q8.QuantConfig(grad_bits=None, wgrad_bits=None))
        x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
        torch.nn.functional.cross_entropy(net(x), y).backward()
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def gradient_errors() -> dict[str, float]:
    """|g - g_ref| / |g_ref| for the default's saves and each probe of them, g_ref with both
    saves in fp32."""
    ref = step_gradient("saves_fp32")
    return {mode or "the default": ((step_gradient(mode) - ref).norm() / ref.norm()).item()
            for mode in (None, "bn_saves_fp32", "act_saves_fp32", "saves_bf16")}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--gradients":
        torch.set_num_threads(1)
        for mode, error in gradient_errors().items():
            print(f"{mode:>16}: {error:.4f} of |g|")
        return 0
    if os.environ.get(CHILD) != argv[0]:
        # train.py imports the application's packages (callbacks/) from the repository root:
        # run again with the root on PYTHONPATH, and from it
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path, CHILD: argv[0]}
        return subprocess.run([sys.executable, __file__, *argv], cwd=ROOT, env=env).returncode
    sys.argv = ["train.py", *argv[1:]]
    with probe(argv[0]):
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
