"""quantize_model on timm models: what is replaced, what is kept, and that they train."""

import copy
import io
import pickle

import pytest
import timm
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

import q8
from q8 import QuantConfig, quantize_model

MODELS = {  # name -> create_model kwargs that keep a CPU step fast
    "resnet18": {},
    "resnet50": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "regnetx_002": {},
    "convnext_atto": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "tf_efficientnet_b0": {},  # Conv2dSame
    "resnetv2_50x1_bit": {},  # StdConv2d
}
HIGH_PRECISION = QuantConfig(weight_bits=16, act_bits=16, grad_bits=16, wgrad_bits=16,
                             grad_rounding="nearest", bn="batchnorm")


def make(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=10, **MODELS[name], **kw)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_transforms_and_trains_a_step(name):
    model = quantize_model(make(name), QuantConfig())
    report = model.q8_report
    # every conv and linear, subclasses included, but those in the branch of a
    # squeeze-excitation gate, which stays in full precision (gates="float")
    branch = [n for n, _, why in report.kept if why == q8.transform.GATE_BRANCH]
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            in_gate = any(n == b or n.startswith(b + ".") for b in branch)
            assert isinstance(m, q8.layers.QuantLayerMixin) != in_gate, n
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    # gradients reach the same parameters as in the fp32 model (zero-init gammas block some)
    ref = make(name)
    nn.functional.cross_entropy(ref(x), y).backward()
    for (pname, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        assert torch.isfinite(p.grad).all(), pname
        assert (p.grad.abs().sum() > 0) == (p_ref.grad.abs().sum() > 0), pname
    before = [p.detach().clone() for p in model.parameters()]
    torch.optim.SGD(model.parameters(), lr=0.01).step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "replaced" in str(report)


@pytest.mark.parametrize("name", MODELS)
def test_twins_keep_the_original_behaviour(name):
    """At 16 bits with nearest rounding the quantized model is the original up to rounding:
    padding of Conv2dSame, weight standardisation of StdConv2d, BatchNormAct2d's activation."""
    ref = make(name).eval()
    model = quantize_model(copy.deepcopy(ref), HIGH_PRECISION).eval()
    x = torch.randn(2, 3, 32, 32)
    y_ref, y = ref(x), model(x)
    assert (y - y_ref).abs().max() <= 1e-2 * y_ref.abs().max()


def test_subclass_twins_subclass_the_originals():
    from timm.layers import BatchNormAct2d, Conv2dSame, StdConv2d

    model = quantize_model(
        nn.Sequential(Conv2dSame(3, 4, 3, stride=2), StdConv2d(4, 4, 3), BatchNormAct2d(4)),
        QuantConfig(),
    )
    assert isinstance(model[0], Conv2dSame) and isinstance(model[0], q8.layers.QuantLayerMixin)
    assert isinstance(model[1], StdConv2d) and isinstance(model[2], BatchNormAct2d)
    assert isinstance(model[2].act, nn.ReLU)  # BatchNormAct2d kept its activation


def test_state_dicts_load_both_ways():
    ref = make("resnet18")
    model = quantize_model(make("resnet18"), QuantConfig())
    model.load_state_dict(ref.state_dict(), strict=True)  # an fp32 checkpoint loads
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.endswith(("act_range", "act_range_steps")) for k in unexpected)


def test_skip_patterns_and_report():
    model = quantize_model(make("resnet18"), QuantConfig(skip=("conv1", "fc")))
    assert type(model.conv1) is nn.Conv2d and type(model.fc) is nn.Linear
    kept = {name: why for name, _, why in model.q8_report.kept}
    assert kept["conv1"] == kept["fc"] == "skipped by config.skip"
    assert "skipped by config.skip" in model.q8_report.summary()


def test_full_precision_config_is_a_no_op():
    fp32 = QuantConfig(weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None,
                       bn="batchnorm")
    model = quantize_model(make("resnet18"), fp32)
    assert not model.q8_report.replaced and type(model.conv1) is nn.Conv2d


def test_report_names_layers_left_in_full_precision():
    model = quantize_model(make("vit_tiny_patch16_224"), QuantConfig())
    summary = model.q8_report.summary()
    assert "LayerNorm" in summary and "no quantized twin" in summary


def test_quantize_model_is_idempotent():
    model = quantize_model(make("resnet18"), QuantConfig())
    again = quantize_model(model, QuantConfig())
    assert not again.q8_report.replaced


def saved_bytes(model, x):
    """Bytes of the tensors autograd saves for backward (each storage once; parameters,
    alive anyway, not counted) over one forward/backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    return sum(seen.values())


def test_saved_for_backward_bytes_are_at_most_0_4_of_fp32():
    x = torch.randn(128, 3, 32, 32)
    fp32 = saved_bytes(make("resnet18"), x)
    q = saved_bytes(quantize_model(make("resnet18"), QuantConfig()), x)
    print(f"resnet18 b128 32x32 saved for backward: fp32 {fp32 / 2**20:.1f} MiB, "
          f"q8 {q / 2**20:.1f} MiB, ratio {q / fp32:.3f}")
    assert q <= 0.40 * fp32


class _RefuseQ8(pickle.Unpickler):
    """Unpickles as a process without q8 would: any class or function of q8 fails."""

    def find_class(self, module, name):
        assert module.split(".")[0] != "q8", f"pickled q8 object: {module}.{name}"
        return super().find_class(module, name)


def _small():
    from timm.layers import BatchNormAct2d, Conv2dSame

    torch.manual_seed(0)
    return nn.Sequential(Conv2dSame(3, 4, 3), BatchNormAct2d(4), nn.SyncBatchNorm(4),
                         nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))


def test_dequantize_model_gives_back_the_float_model():
    """After training in 8 bits: the original classes, the float state_dict keys, no q8
    attribute; it pickles without q8 and computes what the float model of its weights does.
    inplace=False leaves the quantized model as it was and shares its tensors."""
    model = quantize_model(_small(), QuantConfig(backend="reference"))
    model(torch.randn(8, 3, 8, 8)).square().mean().backward()
    assert q8.transform.holds_q8_state(model)
    copy_ = q8.dequantize_model(model, inplace=False)
    assert isinstance(model[0], q8.layers.QuantLayerMixin) and hasattr(model[6], "act_range")
    assert copy_[0].weight is model[0].weight and copy_[2].running_var is model[2].running_var
    for float_model in (copy_, q8.dequantize_model(model)):
        assert [type(m) for m in float_model.modules()] == [type(m) for m in _small().modules()]
        assert set(float_model.state_dict()) == set(_small().state_dict())
        names = [k for m in float_model.modules() for k in vars(m)]
        assert not [k for k in names if k.startswith(("q8_", "_q8_"))]
        assert not q8.transform.holds_q8_state(float_model)
        loaded = _RefuseQ8(io.BytesIO(pickle.dumps(float_model))).load()
        ref = _small().eval()
        ref.load_state_dict(float_model.state_dict())
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(loaded.eval()(x), ref(x))
    assert model is q8.dequantize_model(model)  # in place, as quantize_model


@pytest.mark.parametrize("bn", ["range", "batchnorm"])
def test_sync_batchnorm_becomes_synchronised_range_bn(bn, caplog):
    """Lightning's sync_batchnorm=True gives SyncBatchNorm: Range BN synced over its group
    (per-replica quantized BN for bn="batchnorm" on the 8-bit input, with a warning). On one
    process the sync is
    a no-op: the same forward and backward as the BatchNorm2d twin."""
    group = object()  # a stand-in process group: unused while torch.distributed is not set up
    sync = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4),
                         nn.SyncBatchNorm(4, process_group=group))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    plain.load_state_dict(sync.state_dict())
    config = QuantConfig(backend="reference", bn=bn, bn_compute="8bit")
    with caplog.at_level("WARNING", logger="q8"):
        quantize_model(sync, config)
    quantize_model(plain, config)
    twin = q8.RangeBatchNorm2d if bn == "range" else q8.QuantBatchNorm2d
    assert type(sync[1]) is type(sync[2]) is twin
    if bn == "range":
        assert sync[1].q8_sync == "world" and sync[2].q8_sync is group
        assert "per-replica" not in caplog.text
    else:
        assert "q8_sync" not in vars(sync[1]) and "2 SyncBatchNorm layers" in caplog.text
    x = torch.randn(8, 3, 6, 6)
    outputs = []
    for model in (sync, plain):
        torch.manual_seed(1)  # the same stochastic rounding of the gradients
        y = model(x)
        y.square().mean().backward()
        outputs.append((y, [p.grad for p in model.parameters()]))
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert all(torch.equal(a, b) for a, b in zip(outputs[0][1], outputs[1][1]))
    assert type(q8.dequantize_model(sync)[1]) is nn.SyncBatchNorm


def test_sync_batchnorm_stays_torch_s_under_full_precision_bn(caplog):
    """The default BN computes in full precision: torch's SyncBatchNorm already does, and
    synchronises; q8 leaves it, and its report says why."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    with caplog.at_level("WARNING", logger="q8"):
        quantize_model(model, QuantConfig(backend="reference"))
    assert type(model[1]) is nn.SyncBatchNorm and "per-replica" not in caplog.text
    assert ("1", "SyncBatchNorm", "synchronised by torch, in full precision (bn_compute='float'; "
            "its input is kept in fp32)") in model.q8_report.kept
