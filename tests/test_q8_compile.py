"""Fused (torch.compile) kernels compute what the eager ones do, and fall back cleanly."""

import math
import warnings

import pytest
import torch
from torch import nn

import q8
from q8 import QuantConfig, fake_quantize, quantize_model
from q8.compile import fused


@pytest.fixture
def compiled():
    q8.set_compile(True)
    yield
    q8.set_compile(None)


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def run(model, x):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out, x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("bn", ["range", "batchnorm"])
def test_fused_kernels_match_eager(bn):
    cfg = QuantConfig(grad_rounding="nearest", bn=bn)  # deterministic rounding: comparable
    x = torch.randn(8, 3, 12, 12)
    q8.set_compile(False)
    eager = run(quantize_model(tiny_net(), cfg), x)
    q8.set_compile(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fused_out = run(quantize_model(tiny_net(), cfg), x)
    finally:
        q8.set_compile(None)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    for a, b in zip(eager, fused_out):
        # division vs reciprocal multiply may move a value across a rounding boundary: allow
        # a few one-step differences, never a systematic one
        assert (a - b).abs().mean() <= 1e-3 * a.abs().mean() + 1e-7


def test_hash_rounding_is_unbiased(compiled):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, generator=g)
    n = 512
    draws = torch.stack([fake_quantize(x, 8, "stochastic", generator=g) for _ in range(n)])
    s = q8.quantizer.qparams(*torch.aminmax(x), 8)[0]
    p = (x / s).double()
    p = p - p.floor()
    sigma = ((p * (1 - p)).mean().sqrt() * s).item()
    rms = (draws.double().mean(0) - x).pow(2).mean().sqrt().item()
    assert 0.9 < rms / (sigma / math.sqrt(n)) < 1.1
    again = fake_quantize(x, 8, "stochastic", generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, fake_quantize(x, 8, "stochastic",
                                            generator=torch.Generator().manual_seed(5)))


def test_uniform_hash_is_uniform():
    u = q8.quantizer.uniform_hash(torch.empty(1 << 20), torch.tensor(123, dtype=torch.int64))
    counts = torch.histc(u, bins=64, min=0, max=1)
    expected = u.numel() / 64
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 63 + 6 * math.sqrt(2 * 63)  # chi-square, 63 dof: mean 63, sd 11.2
    assert u.min() >= 0 and u.max() < 1


def test_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    q8.set_compile(True)
    try:
        f = fused(lambda x: x * 2)
        with pytest.warns(UserWarning, match="eager"):
            assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 2.0))  # no second warning
    finally:
        q8.set_compile(None)


def test_q8_compile_env_switch(monkeypatch):
    monkeypatch.setenv("Q8_COMPILE", "0")
    assert not q8.compile_enabled()
    monkeypatch.setenv("Q8_COMPILE", "1")
    assert q8.compile_enabled()
