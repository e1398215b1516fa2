"""scripts/act_screen.py: each probe changes one activation quantizer, and only inside its block."""

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import q8

BIG = {(2, 3, 6, 6), (2, 8, 6, 6)}  # the input's and the activations' shapes


def saved_maps(model: nn.Module) -> list[tuple[str, torch.dtype]]:
    """(which map, dtype) of the activation-sized tensors autograd keeps for backward."""
    saved = []

    def pack(t):
        if tuple(t.shape) in BIG:
            saved.append(("input" if t.shape[1] == 3 else "map", t.dtype))
        return t

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sorted(saved, key=str)


def model() -> nn.Module:
    """A dense 1x1 conv, BN, SiLU and a depthwise 3x3 conv, in the default's 8 bits."""
    torch.manual_seed(0)
    return q8.quantize_model(nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8)),
        q8.QuantConfig())


U8 = torch.uint8
DEFAULT = [("input", U8), ("map", U8), ("map", U8), ("map", U8)]  # conv, BN, SiLU, depthwise


@pytest.mark.parametrize(("mode", "fp32_maps"), [
    ("dw_fp32", [("map", torch.float32)]), ("dw_per_channel", [("map", torch.float32)]),
    ("dense_fp32", [("input", torch.float32)]), ("act_saves_fp32", [("map", torch.float32)]),
    ("bn_saves_fp32", [("map", torch.float32)]), ("dw_16bit", [("map", torch.int32)]),
    ("saves_bf16", [("map", torch.bfloat16), ("map", torch.bfloat16)]),
    ("saves_fp32", [("map", torch.float32), ("map", torch.float32)])])
def test_each_probe_keeps_one_map_out_of_8_bits(load_script, mode, fp32_maps):
    screen = load_script("act_screen")
    assert saved_maps(model()) == DEFAULT
    with screen.probe(mode):
        changed = saved_maps(model())
    assert saved_maps(model()) == DEFAULT  # undone after the block
    assert [m for m in changed if m[1] != U8] == fp32_maps
    assert len(changed) == len(DEFAULT)


def test_per_channel_depthwise_input_is_on_a_grid_per_channel(load_script):
    """dw_per_channel: the depthwise conv computes on q8.fake_quantize(x, 8, dim=1) of its
    input, and keeps that for backward."""
    screen = load_script("act_screen")
    net, x, seen = model(), torch.randn(2, 3, 6, 6), []
    with screen.probe("dw_per_channel"), saved_tensors_hooks(
            lambda t: seen.append(t) or t, lambda t: t):
        net(x).sum().backward()
    kept = next(t for t in seen if t.dtype == torch.float32 and tuple(t.shape) == (2, 8, 6, 6))
    with torch.no_grad():
        dw_input = net[:3](x)
    expected = q8.fake_quantize(dw_input, 8, dim=1)
    assert torch.equal(kept, expected) and not torch.equal(expected, dw_input)


def test_an_unknown_mode_names_the_valid_ones(load_script):
    screen = load_script("act_screen")
    with pytest.raises(SystemExit, match="valid are dw_fp32"), screen.probe("nope"):
        pass
