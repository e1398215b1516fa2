"""On a CUDA GPU only (`pytest -m cuda`, run by scripts/gpu_check.sh): a training step waits
for the GPU nowhere, and the application trains with trainer=gpu. The kernel, GEMM-mode and
layer suites run their `cuda` cases there too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from q8 import QuantConfig, quantize_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("gemm", ["dequantized", "codes", "int8"])
@pytest.mark.parametrize("bn", ["range", "batchnorm"])
def test_a_training_step_never_waits_for_the_gpu(gemm, bn):
    """No host synchronisation inside forward and backward (after a first step, which builds
    the kernels and caches Range BN's chunk tables)."""
    import timm

    torch.manual_seed(0)
    model = quantize_model(timm.create_model("resnet18", num_classes=10),
                           QuantConfig(gemm=gemm, bn=bn)).cuda().to(
        memory_format=torch.channels_last)
    x = torch.randn(32, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device="cuda")
    nn.functional.cross_entropy(model(x), y).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
    layer = next(m for m in model.modules() if hasattr(m, "q8_kernels"))
    assert layer.q8_kernels.on(x).name == "cuda"


def test_the_app_trains_on_the_gpu(tiny_config, tmp_path: Path):
    from train import train

    run_dir = tmp_path / "run"
    metrics = train(tiny_config("trainer=gpu", "quant.gemm=codes", run_dir=run_dir))
    assert metrics["global_step"] == 2 and metrics["quant_config"]["gemm"] == "codes"
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] is not None
