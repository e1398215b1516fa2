"""scripts/ptq_probe.py: the inputs its rules match are rounded as q8's quantizer rounds them,
and nothing else changes."""

import torch
from torch import nn

from q8 import fake_quantize


def test_probe_quantizes_the_matched_inputs_only(load_script) -> None:
    probe = load_script("ptq_probe")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(),
                          nn.Linear(6 * 4 * 4, 5)).eval()
    scales = torch.tensor([1e-3, 1e-2, 1.0, 10.0]).view(1, 4, 1, 1)
    images = torch.randn(64, 4, 6, 6) * scales
    with torch.no_grad():  # every channel counts as much: the small ones too
        model[0].weight /= scales.view(1, 4, 1, 1)
    with torch.no_grad():
        fp32 = model(images).argmax(1)
        per_channel = model[1:](model[0](fake_quantize(images, 8, dim=1))).argmax(1)
        per_tensor = model[1:](model[0](fake_quantize(images, 8))).argmax(1)
    assert not torch.equal(per_channel, per_tensor)  # the test can tell them apart
    rules = [("0", "channel")]
    assert probe.accuracy(model, images, per_channel, rules, batch=64) == 100.0
    assert probe.accuracy(model, images, per_tensor, [("0", "tensor")], batch=64) == 100.0
    assert probe.accuracy(model, images, fp32, [], batch=64) == 100.0  # the hooks are gone
