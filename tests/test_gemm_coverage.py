"""q8.coverage: which GEMMs of a training step ran on quantized operands, by measurement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q8
from q8.gemm_coverage import grid_bits
from q8.kernels.reference import fake_quant, minmax


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
def test_values_on_q8_s_grid_have_its_bits(bits):
    """x_hat of q8's quantizer lies on its grid: grid_bits finds B, whatever the data's sign
    (the grid's range holds 0) or rounding."""
    g = torch.Generator().manual_seed(bits)
    for x in (torch.randn(50_000, generator=g), torch.rand(50_000, generator=g) * 2 + 0.5,
              -torch.rand(50_000, generator=g)):
        for seed in (None, 7):
            assert grid_bits(fake_quant(x, *minmax(x), bits, seed)) == bits


def test_full_precision_values_and_per_channel_grids():
    g = torch.Generator().manual_seed(0)
    assert grid_bits(torch.randn(5000, generator=g)) is None  # fp32: on no grid
    assert grid_bits(torch.randn(200, 8, generator=g).bfloat16()) is None
    rows = torch.randn(16, 300, generator=g) * torch.logspace(-2, 2, 16)[:, None]
    per_channel = fake_quant(rows, *minmax(rows, 0), 8)  # one grid per row
    assert grid_bits(per_channel) == 8
    assert grid_bits(torch.randint(-128, 127, (64,), dtype=torch.int8)) == 8  # codes
    assert grid_bits(torch.zeros(10)) == 0


class Bypass(nn.Module):
    """Reads its linear layers' weights in its own code: with F.linear (timm's BEiT qkv, which
    q8 routes to the twin) and with a matmul (which it does not); multiplies two activations
    (attention's QK^T and PV)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 10)

    def forward(self, x):
        q, k, v = F.linear(x, self.qkv.weight, self.qkv.bias).chunk(3, dim=-1)
        attn = (q @ k.transpose(-1, -2)).softmax(-1)
        return (attn @ v) @ self.proj.weight.T + self.proj.bias


def test_a_quantized_cnn_runs_every_gemm_on_quantized_operands():
    torch.manual_seed(0)
    model = q8.quantize_model(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3),
        nn.Flatten(), nn.Linear(16 * 14 * 14, 10)), q8.QuantConfig())
    report = q8.coverage(model, torch.randn(8, 3, 16, 16))
    assert report.share("forward") == report.share("backward") == 1.0
    phases = {(g.module, g.phase) for g in report.gemms}
    assert ("Sequential.0", "forward") in phases and ("Sequential.5", "backward") in phases
    assert {g.module_class for g in report.gemms} == {"QuantConv2d", "QuantLinear"}
    # backward: conv 0 needs no input gradient (the data do not require one)
    assert sum(g.phase == "backward" for g in report.gemms) == 3 + 2  # one call per conv
    assert all(p.grad is None for p in model.parameters())  # the step leaves no gradient


def test_a_gemm_outside_the_twin_is_reported_in_full_precision():
    """The F.linear on qkv's weight runs qkv's 8-bit GEMM, and the two attention products run
    in 8 bits; the matmul on proj's weight runs in fp32, though proj's class says QuantLinear:
    it is listed with its module and operands."""
    torch.manual_seed(0)
    model = q8.quantize_model(Bypass(), q8.QuantConfig())
    assert type(model.proj) is q8.QuantLinear
    report = q8.coverage(model, torch.randn(4, 64, 32))
    forward = [g for g in report.gemms if g.phase == "forward"]
    qkv = [g for g in forward if g.flops == 2 * 4 * 64 * 32 * 96]  # 2 m k n
    assert type(model).__name__ == "Q8Bypass"  # its own F.linear calls go to the twins
    assert len(qkv) == 1 and qkv[0].quantized and qkv[0].module == "Q8Bypass"
    fp = [g for g in report.full_precision() if g.phase == "forward"]
    assert len(fp) == 1 and fp[0].module == "Q8Bypass"
    assert fp[0].flops == 2 * 4 * 64 * 32 * 10  # proj's matmul
    total = sum(g.flops for g in forward)
    assert report.share("forward") == pytest.approx(1 - sum(g.flops for g in fp) / total)
    assert "full precision" in report.summary() and "Bypass" in report.summary()


def test_an_unquantized_model_has_no_quantized_flops():
    torch.manual_seed(0)
    report = q8.coverage(nn.Sequential(nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 10)),
                         torch.randn(64, 300))
    assert report.share("forward") == 0.0 and report.share("backward") == 0.0
    assert report.to_dict()["forward_share"] == 0.0


@pytest.mark.parametrize(("preset", "share"), [
    ("q8_bifurcated", 1.0), pytest.param("fp32", 0.0, marks=pytest.mark.slow)])
def test_the_app_reports_coverage_at_the_first_step(preset, share, tiny_config, tmp_path):
    """The default callbacks measure the first step: every GEMM of q8's ResNet on quantized
    operands, none of fp32's; the figures reach metrics.json."""
    import json

    from train import train

    run_dir = tmp_path / "run"
    train(tiny_config(f"quant={preset}", run_dir=run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["coverage/forward_share"] == share
    assert metrics["coverage/backward_share"] == share


def test_the_coverage_table_script_writes_one_row_per_model(load_script, tmp_path):
    table = load_script("coverage_table")
    out = tmp_path / "c.md"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{table.BEGIN}\nold\n{table.END}\nrest\n")
    rows = table.main(["--models", "test_resnet,test_vit", "--out", str(out),
                       "--readme", str(readme)])
    assert [r["model"] for r in rows] == ["test_resnet", "test_vit"]
    for row in rows:  # a CNN and a ViT: every GEMM in 8 bits, attention's products too
        assert row["forward"] == row["backward"] == 1.0 and not row["full_precision"]
    text = out.read_text()
    assert "| test_resnet |" in text and "| test_vit |" in text
    short = readme.read_text()
    assert short.startswith("intro\n") and short.endswith("rest\n") and "old" not in short
    assert "| test_vit | 160x160 | 100.0% / 100.0% |" in short


def test_one_grid_per_row_or_column_is_found():
    """Attention's P and dS are quantized per row (per query), and a product may read them
    transposed: each row (or column) on its own 8-bit grid is 8 bits; fp32 values are on none,
    and rows too short to tell are not taken for a grid."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 40, 50, generator=g) * torch.logspace(-3, 0, 40)[:, None]
    rows = fake_quant(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), 8)
    assert grid_bits(rows) == 8 and grid_bits(rows.mT) == 8
    assert grid_bits(x) is None and grid_bits(x.mT) is None
    assert grid_bits(torch.randn(64, 2, generator=g)) is None
