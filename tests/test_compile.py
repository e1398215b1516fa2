"""q8 under torch.compile: the kernels are custom ops with fake implementations, the seeds of
stochastic rounding are tensors drawn inside the graph, and nothing else breaks a graph.

Every backend compiles with fullgraph=True (`cuda` here under Triton's interpreter, on CPU
tensors). The forward's rounding is to nearest, so the first loss equals eager's; the
backward's noise is the reference's hash of seeds that torch's generator draws, as in eager.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from q8 import QuantConfig, quantize_model
from tests.conftest import BACKENDS, backend_params, device_of

CPU_BACKENDS = backend_params(["reference", "cpu"])
EVERY_BACKEND = backend_params(BACKENDS)


def _timm(name: str) -> nn.Module:
    import timm

    torch.manual_seed(0)
    kwargs = {"num_classes": 10}
    if name.startswith("vit"):
        kwargs.update(img_size=32, patch_size=8, depth=2)  # every kind of block, twice
    return timm.create_model(name, **kwargs)


def _quantized(model: nn.Module, backend: str, **config) -> nn.Module:
    return quantize_model(model, QuantConfig(backend=backend, **config))


@pytest.mark.parametrize("backend", [pytest.param("reference", marks=pytest.mark.slow), "cpu"])
@pytest.mark.parametrize("name", [pytest.param("resnet18", marks=pytest.mark.slow),
                                  "vit_tiny_patch16_224"])
def test_a_quantized_timm_model_traces_as_one_graph(backend, name):
    """Dynamo captures the whole forward: conv, linear, Range BN, ReLU, max-pool, attention
    and their autograd functions, with no graph break."""
    model = _quantized(_timm(name), backend)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # the seeds of the backward's stochastic rounding
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 10))


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("bn", ["range", pytest.param("batchnorm", marks=pytest.mark.slow)])
def test_fullgraph_training_step_matches_eager(backend, bn):
    """With Range BN a compiled step's loss equals eager's to the bit (nearest rounding in
    forward; Range BN's sums are exact sums of integers), and so do the running statistics and
    input ranges it updates. Standard BN runs Inductor's own batch-norm decomposition, whose
    variance rounds differently: there the step compiles and trains. The running statistics
    are one lerp from eager's, which Inductor may round differently: within a few ulps."""
    dev = device_of(backend)
    # Range BN in the paper's setting (q8_paper): one activation range per tensor. Inductor may
    # sum a depthwise conv in another order than eager (one ulp); on this net's per-tensor grid
    # the loss still comes out equal, with a range per channel it does not
    ranges = "tensor" if bn == "range" else "channel"
    eager = _quantized(_net(), backend, bn=bn, act_ranges=ranges).to(dev)
    compiled_model = copy.deepcopy(eager)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 3, 12, 12, generator=g), torch.randint(0, 10, (8,), generator=g)
    x, y = x.to(dev), y.to(dev)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model, fullgraph=True)
    eager_loss, compiled_loss = _step(eager, x, y), _step(compiled, x, y)
    assert torch.isfinite(compiled_loss)
    for p in compiled_model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    if bn == "range":
        assert torch.equal(eager_loss, compiled_loss)
        for (name, a), (_, b) in zip(eager.named_buffers(), compiled_model.named_buffers()):
            a, b = a.double(), b.double()
            ulps = (a - b).abs().max() / (2**-23 * a.abs().max().clamp(min=1e-30))
            assert ulps <= 4, (name, float(ulps))


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_compiled_backward_draws_the_same_noise(backend):
    """Linear layers: dL/dW = g_l^T x_hat, where g_l is rounded stochastically with seeds drawn
    from torch's generator inside the compiled backward. Given the same seed they equal eager's
    to the bit: the seed is the same draw and the noise the same hash."""
    torch.manual_seed(0)
    dev = device_of(backend)
    eager = _quantized(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), backend,
                       grad_rounding="stochastic").to(dev)
    compiled_model = copy.deepcopy(eager)
    x, y = torch.randn(16, 64).to(dev), torch.randint(0, 10, (16,)).to(dev)
    torch._dynamo.reset()
    _step(eager, x, y)
    _step(torch.compile(compiled_model, fullgraph=True), x, y)
    for a, b in zip(eager, compiled_model):
        if isinstance(a, nn.Linear):
            assert torch.equal(a.weight.grad, b.weight.grad)


@pytest.mark.slow
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224"])
def test_fullgraph_compile_trains_the_timm_models(backend, name):
    """A ResNet, an EfficientNet and a ViT. The captured graph run on eager's kernels
    (aot_eager) trains as eager does, loss for loss to the bit over three SGD steps; Inductor,
    which generates its own kernels for the ops around q8's (SiLU, LayerNorm, softmax) and so
    rounds them differently, compiles the same graph, and its step's loss and gradients are
    finite."""
    models = [_quantized(_timm(name), backend) for _ in range(3)]
    eager, traced = models[0], torch.compile(models[1], backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
    torch._dynamo.reset()
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models[:2]]
    for _ in range(3):
        losses = [_step(m, x, y) for m in (eager, traced)]
        assert torch.equal(*losses) or (losses[0].isnan() and losses[1].isnan())
        for opt in opts:
            opt.step()
            opt.zero_grad()
    assert torch.isfinite(_step(torch.compile(models[2], fullgraph=True), x, y))
    assert all(torch.isfinite(p.grad).all() for p in models[2].parameters())


@pytest.mark.slow
def test_the_app_trains_a_compiled_model(tiny_config, tmp_path):
    """compile=true: the plugin quantizes the backbone, torch.compile traces it at its first
    step, and the run trains, validates and tests (timm's tiny test_resnet keeps it short)."""
    from train import train

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    metrics = train(tiny_config("compile=true", "model=timm", "model.name=test_resnet",
                                run_dir=tmp_path / "run"))
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo compiled the backbone
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items()
               if isinstance(v, float))
    assert "test/acc" in metrics


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_module_reading_a_twin_s_weight_compiles_as_one_graph(backend):
    """timm's BEiT pattern, F.linear(x, self.qkv.weight, ...) sent to the twin inside the
    parent's forward, traces with fullgraph and gives eager's output."""
    torch.manual_seed(0)

    class ReadsWeight(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(16, 48)

        def forward(self, x):
            return F.linear(x, self.qkv.weight, self.qkv.bias).relu()

    eager = _quantized(ReadsWeight(), backend)
    compiled_model = copy.deepcopy(eager)
    x = torch.randn(4, 10, 16)
    torch._dynamo.reset()
    out = torch.compile(compiled_model, fullgraph=True)(x)
    assert torch.equal(eager(x), out) and int(compiled_model.qkv.act_range_steps) == 1
