"""How much does 8-bit activation quantization cost a model trained in fp32? Eval only.

    python scripts/ptq_probe.py outputs/reproduce/fashion_mnist/efficientnet_b0/fp32/seed0

loads the run's final checkpoint (a timm model trained by train.py on Fashion-MNIST), and tests
it on the first --images test images with the input of chosen convolutions rounded to 8 bits
(nearest, over each test batch's own [min, max]: one range per tensor, or one per channel) and
everything else in fp32. Weights stay fp32: the activations are what a per-tensor grid costs a
depthwise net (docs/MOBILE_NETS.md). Each probe is a list of (module-name pattern, ranges); the
first pattern that matches a conv or linear layer decides its input's ranges.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from q8.kernels.reference import fake_quant, minmax
from q8.lit.data import FashionMNISTDataModule
from q8.lit.models import create_backbone

DW, PW, PWL = "*.conv_dw", "*.conv_pw", "*.conv_pwl"  # timm's names in EfficientNet/MobileNet
PROBES: dict[str, list[tuple[str, str]]] = {
    "fp32": [],
    "all, per tensor": [("*", "tensor")],
    "depthwise inputs per channel": [(DW, "channel"), ("*", "tensor")],
    "project (pwl) inputs per channel": [(PWL, "channel"), ("*", "tensor")],
    "all per channel": [("*", "channel")],
    "only depthwise inputs, per tensor": [(DW, "tensor")],
    "only expand (pw) inputs, per tensor": [(PW, "tensor")],
    "only project (pwl) inputs, per tensor": [(PWL, "tensor")],
}


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, rules: list[tuple[str, str]],
             bits: int = 8, batch: int = 128) -> float:
    """Test accuracy in % with the inputs of the layers `rules` match quantized to `bits`."""
    def quantize(ranges: str):  # noqa: ANN202
        def hook(_: nn.Module, args: tuple) -> tuple:
            x = args[0]
            return (fake_quant(x, *minmax(x, 1 if ranges == "channel" else None), bits),
                    *args[1:])
        return hook

    handles = []
    for name, m in model.named_modules():
        rule = next((r for p, r in rules if fnmatch.fnmatch(name, p)), None)
        if rule is not None and isinstance(m, (nn.Conv2d, nn.Linear)):
            handles.append(m.register_forward_pre_hook(quantize(rule)))
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(images), batch):
            right += (model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
    for h in handles:
        h.remove()
    return 100.0 * right / len(images)


def load_run(run: Path) -> nn.Module:
    """The timm model of a train.py run, with its final weights."""
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    model = create_backbone(hp["model_name"], hp["num_classes"], hp["in_chans"],
                            hp["small_input"], hp["model_kwargs"])
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
                           if k.startswith("model.")})
    return model


def test_images(n: int, image_size: int = 32) -> tuple[Tensor, Tensor]:
    dm = FashionMNISTDataModule(image_size=image_size, augment=False, eval_batch_size=n)
    dm.setup("test")
    return next(iter(dm.test_dataloader()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="train.py run directories (fp32)")
    p.add_argument("--images", type=int, default=2048, help="first N test images")
    p.add_argument("--image-size", type=int, default=32)
    args = p.parse_args(argv)
    images, labels = test_images(args.images, args.image_size)
    print("| run | " + " | ".join(PROBES) + " |")
    print("|---|" + "---|" * len(PROBES))
    for run in args.runs:
        model = load_run(run)
        row = [f"{accuracy(model, images, labels, rules):.1f}" for rules in PROBES.values()]
        print(f"| {run} | " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
