"""A Lightning project that is not q8's app: its own LightningModule around torchvision's
ResNet-18, passed in and saved as a hyper-parameter (lightning-hydra-template's pattern), its own
data (scikit-learn's digits as 3-channel 16x16 images), and q8 added with one line,
`plugins=[Q8Precision(QuantConfig())]`. tests/test_q8_lightning.py runs it in-process, in
fresh processes and under DDP (Lightning starts the other rank by running this file again).
Only the functions that train with q8 import it.

    python tests/lightning_user_project.py fit --out DIR [--devices 2] [--steps 30] [--sync-bn]
    python tests/lightning_user_project.py check --out DIR    # a fresh process: load, compare
    python tests/lightning_user_project.py load --out DIR     # a process that cannot import q8
    python tests/lightning_user_project.py load check --out DIR   # one after the other
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

if TYPE_CHECKING:
    from q8 import QuantConfig


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module | None = None, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()  # `net` too: the checkpoint pickles it
        self.net = net if net is not None else torchvision.models.resnet18(num_classes=10)
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def digits(n: int | None = None) -> TensorDataset:
    from sklearn.datasets import load_digits

    pixels, labels = load_digits(return_X_y=True)
    x = torch.tensor(pixels[:n], dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    return TensorDataset((x - 0.3) / 0.4, torch.tensor(labels[:n]))


def probe() -> torch.Tensor:
    """A fixed batch whose eval-mode logits the checks compare."""
    return digits(64).tensors[0]


def trainer(out: Path, devices: int, steps: int, config: QuantConfig | None,
            sync_bn: bool = False) -> L.Trainer:
    from q8.lightning import Q8Precision

    plugin = Q8Precision(config) if config is not None else None
    return L.Trainer(accelerator="cpu", devices=devices, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     strategy="ddp" if devices > 1 else "auto", default_root_dir=out,
                     plugins=[plugin] if plugin else None, sync_batchnorm=sync_bn)


def fit(out: Path, devices: int = 1, steps: int = 30, sync_bn: bool = False) -> Classifier:
    """Train `steps` steps in 8 bits; write the checkpoint, the losses, the probe's logits and,
    from every rank, the norms' classes and running means."""
    from q8 import QuantConfig

    L.seed_everything(0)
    model = Classifier(torchvision.models.resnet18(num_classes=10))
    t = trainer(out, devices, steps, QuantConfig(backend="cpu"), sync_bn)
    t.fit(model, DataLoader(digits(), batch_size=32, shuffle=True))
    t.save_checkpoint(out / "model.ckpt")
    bn = {n for n, m in torchvision.models.resnet18().named_modules() if type(m) is nn.BatchNorm2d}
    norms = {name: [type(m).__name__, str(getattr(m, "q8_sync", None))]
             for name, m in model.net.named_modules() if name in bn}
    (out / f"norms_rank{t.global_rank}.json").write_text(json.dumps(norms))
    torch.save(model.net.bn1.running_mean, out / f"bn1_mean_rank{t.global_rank}.pt")
    if t.is_global_zero:
        model.eval()
        with torch.no_grad():
            torch.save(model(probe()), out / "logits.pt")
        (out / "losses.json").write_text(json.dumps(model.losses))
    return model


def check(out: Path) -> None:
    """In a fresh process: the checkpoint loads without q8, then in 8 bits with the buffers it
    was trained with (the same logits to the bit), and resumes at its step."""
    from q8.lightning import Q8Precision

    path = out / "model.ckpt"
    plain = Classifier.load_from_checkpoint(path, weights_only=False)  # the float model
    assert type(plain.net.conv1) is nn.Conv2d, type(plain.net.conv1)
    model = Classifier.load_from_checkpoint(path, weights_only=False)
    plugin = Q8Precision.from_checkpoint(str(path))
    t = trainer(out, 1, 40, plugin.config)
    # weights_only=False: the hyper-parameters hold a module (torch.load refuses it by default)
    t.validate(model, DataLoader(digits(64), batch_size=32), ckpt_path=path, verbose=False,
               weights_only=False)
    assert type(model.net.conv1).__name__ == "QuantConv2d", type(model.net.conv1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(probe()), torch.load(out / "logits.pt")), "logits differ"
    t = trainer(out, 1, 40, plugin.config)
    t.fit(model, DataLoader(digits(), batch_size=32, shuffle=True), ckpt_path=path,
          weights_only=False)
    assert t.global_step == 40, t.global_step
    print("checked")


def load(out: Path) -> None:
    """Where q8 cannot be imported: the checkpoint, its hyper-parameters' `net` included, loads
    as the float model of the trained weights, which classifies the probe as the 8-bit one did
    (up to the quantization's noise)."""
    assert "q8" not in sys.modules
    sys.modules["q8"] = None  # from here on `import q8` fails, and so would unpickling q8's classes
    try:
        model = Classifier.load_from_checkpoint(out / "model.ckpt", weights_only=False)
    finally:
        del sys.modules["q8"]  # q8 was never imported: a `check` after this one imports it first
    assert not [name for name in sys.modules if name.startswith("q8")]
    roots = {type(m).__module__.split(".")[0] for m in model.modules()}
    assert roots == {"__main__", "torch", "torchvision"}, roots
    assert not any(k.endswith("act_range") for k in model.state_dict())
    model.eval()
    with torch.no_grad():
        agree = (model(probe()).argmax(1) == torch.load(out / "logits.pt").argmax(1)).float()
    assert agree.mean() >= 0.8, agree.mean()  # 0.95 here; chance is 0.1
    print("loaded without q8")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", nargs="+", choices=["fit", "check", "load"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--sync-bn", action="store_true", help="the Trainer's sync_batchnorm=True")
    args = p.parse_args()
    for what in args.what:
        if what == "fit":
            fit(args.out, args.devices, args.steps, args.sync_bn)
        else:
            check(args.out) if what == "check" else load(args.out)
    sys.exit(0)
