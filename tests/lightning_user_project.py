"""A Lightning project that is not q8's app: its own LightningModule around torchvision's
ResNet-18, its own data (scikit-learn's digits as 3-channel 16x16 images), and q8 added with one
line, `plugins=[Q8Precision(QuantConfig())]`. tests/test_q8_lightning.py runs it in-process, in
fresh processes and under DDP (Lightning starts the other rank by running this file again).

    python tests/lightning_user_project.py fit --out DIR [--devices 2] [--steps 30]
    python tests/lightning_user_project.py check --out DIR    # a fresh process: load, compare
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

from q8 import QuantConfig
from q8.lightning import Q8Precision


class Classifier(L.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torchvision.models.resnet18(num_classes=10)
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


def trainer(out: Path, devices: int, steps: int, config: QuantConfig | None) -> L.Trainer:
    plugin = Q8Precision(config) if config is not None else None
    return L.Trainer(accelerator="cpu", devices=devices, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0,
                     strategy="ddp" if devices > 1 else "auto", default_root_dir=out,
                     plugins=[plugin] if plugin else None)


def fit(out: Path, devices: int = 1, steps: int = 30) -> Classifier:
    """Train `steps` steps in 8 bits; write the checkpoint, the losses and the probe's logits."""
    L.seed_everything(0)
    model = Classifier()
    t = trainer(out, devices, steps, QuantConfig(backend="cpu"))
    t.fit(model, DataLoader(digits(), batch_size=32, shuffle=True))
    t.save_checkpoint(out / "model.ckpt")
    if t.is_global_zero:
        model.eval()
        with torch.no_grad():
            torch.save(model(probe()), out / "logits.pt")
        (out / "losses.json").write_text(json.dumps(model.losses))
    return model


def check(out: Path) -> None:
    """In a fresh process: the checkpoint loads without q8, then in 8 bits with the buffers it
    was trained with (the same logits to the bit), and resumes at its step."""
    path = out / "model.ckpt"
    plain = Classifier.load_from_checkpoint(path)  # a float model with the trained weights
    assert isinstance(plain.net.conv1, torch.nn.Conv2d)
    model = Classifier.load_from_checkpoint(path)
    plugin = Q8Precision.from_checkpoint(str(path))
    t = trainer(out, 1, 40, plugin.config)
    t.validate(model, DataLoader(digits(64), batch_size=32), ckpt_path=path, verbose=False)
    assert type(model.net.conv1).__name__ == "QuantConv2d", type(model.net.conv1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(probe()), torch.load(out / "logits.pt")), "logits differ"
    t = trainer(out, 1, 40, plugin.config)
    t.fit(model, DataLoader(digits(), batch_size=32, shuffle=True), ckpt_path=path)
    assert t.global_step == 40, t.global_step
    print("checked")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["fit", "check"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    fit(args.out, args.devices, args.steps) if args.what == "fit" else check(args.out)
    sys.exit(0)
