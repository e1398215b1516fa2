"""Products of two activations in 8 bits (q8.attention): SDPA and matmul inside a Q8 twin."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import q8
from q8.attention import (
    ProductSpec,
    QuantAttentionFn,
    QuantGateFn,
    attention,
    multiplies_activations,
)
from q8.functional import GradSpec
from q8.kernels import Kernels
from q8.kernels.reference import fake_quant, minmax, qparams

FULL = ProductSpec(None, GradSpec(None, None))
Q8 = ProductSpec(8, GradSpec(8, 16))
GRADS_ONLY = ProductSpec(None, GradSpec(8, 16))


def sqnr_db(ref, approx):
    return 10 * math.log10(ref.pow(2).sum() / (approx - ref).pow(2).sum())


def rounding_noise_db(t, bits):
    """Stochastic rounding on t's own range adds noise of variance s^2/6 per element: the SQNR
    of t's quantized copy (as tests/test_q8_bifurcation.py derives it)."""
    s = qparams(*minmax(t), bits)[0]
    return 10 * math.log10(t.pow(2).mean() / (s * s / 6))


def row_noise_db(t, bits):
    """The same with one range per row (last dimension): the noise power is the mean of each
    row's s^2/6."""
    lo, hi = t.amin(-1, keepdim=True), t.amax(-1, keepdim=True)
    s = qparams(lo, hi, bits)[0]
    return 10 * math.log10(t.pow(2).mean() / (s * s / 6).mean())


def qkv(b=2, h=3, lq=17, lk=17, d=16, hk=None, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hk or h, lk, d, generator=g, dtype=dtype)
    v = torch.randn(b, hk or h, lk, d, generator=g, dtype=dtype)
    return [t.requires_grad_(True) for t in (q, k, v)]


def run(fn, inputs, g_out):
    out = fn(*inputs)
    out.backward(g_out)
    return out.detach(), [t.grad for t in inputs]


def kernels(backend="reference"):
    return Kernels(backend)


def fq(t, bits=8):
    return fake_quant(t, *minmax(t), bits)


def test_forward_is_softmax_of_quantized_q_k_times_quantized_v():
    q, k, v = qkv()
    bias = torch.randn(1, 3, 17, 17)
    out = attention(q, k, v, bias, spec=Q8, kernels=kernels())
    p = torch.softmax((fq(q) @ fq(k).mT) * (1 / math.sqrt(16)) + bias, -1)
    p_hat = fake_quant(p, p.amin(-1, keepdim=True), p.amax(-1, keepdim=True), 8)  # per row
    assert torch.equal(out, p_hat @ fq(v))


@pytest.mark.parametrize("case", ["plain", "bool_mask", "float_bias", "causal", "gqa", "scale"])
def test_at_full_precision_it_is_sdpa(case):
    """Nothing quantized: SDPA's output and gradients, to fp32's rounding (sums of 16-17
    products of O(1) values, |error| well under 1e-5)."""
    q, k, v = qkv(hk=1 if case == "gqa" else None)
    kw = {}
    if case == "bool_mask":
        kw["attn_mask"] = torch.rand(17, 17, generator=torch.Generator().manual_seed(1)) > 0.3
        kw["attn_mask"].fill_diagonal_(True)  # no row fully masked
    elif case == "float_bias":
        kw["attn_mask"] = torch.randn(1, 3, 17, 17).requires_grad_(True)
    elif case == "causal":
        kw["is_causal"] = True
    elif case == "gqa":
        kw["enable_gqa"] = True
    elif case == "scale":
        kw["scale"] = 0.3
    g_out = torch.randn(2, 3, 17, 16)
    extra = [kw["attn_mask"]] if case == "float_bias" else []
    ours = run(lambda *t: attention(*t[:3], **kw, spec=FULL, kernels=kernels()),
               [q, k, v, *extra], g_out)
    ref_inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, *extra)]
    if extra:
        kw["attn_mask"] = ref_inputs[3]
    ref = run(lambda *t: F.scaled_dot_product_attention(*t[:3], **kw), ref_inputs, g_out)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=1e-5)
    for a, b in zip(ours[1], ref[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_dropout_backward_is_the_derivative_of_its_forward():
    """With dropout, a fixed seed gives one mask: the gradient along a direction equals the
    central difference (float64: O(eps^2) error)."""
    q, k, v = [t.detach().double() for t in qkv(lq=5, lk=6, d=4)]
    direction = [torch.randn_like(t) for t in (q, k, v)]

    def f(*t):
        torch.manual_seed(3)
        return QuantAttentionFn.apply(*t, None, 0.4, 0.5, FULL, kernels())

    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = f(*inputs)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    analytic = sum((t.grad * d).sum() for t, d in zip(inputs, direction))
    eps = 1e-6
    plus = f(*[t + eps * d for t, d in zip((q, k, v), direction)])
    minus = f(*[t - eps * d for t, d in zip((q, k, v), direction)])
    numeric = ((plus - minus) * w).sum() / (2 * eps)
    without = QuantAttentionFn.apply(q, k, v, None, 0.0, 0.5, FULL, kernels())
    assert not torch.allclose(out, without)  # the dropout did drop attention weights
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)


def test_gradient_sqnr_is_what_the_bits_give():
    """8-bit g (stochastic): dV = P^T g_hat keeps g_hat's SQNR. dQ and dK see g's noise through
    dS and dS's own rounding, per row: their noise powers add, 1/SQNR = 1/SQNR_g + 1/SQNR_dS,
    within the same 1.5 dB as the conv twins' test."""
    torch.manual_seed(1)  # g independent of q, k, v (seed 0)
    q, k, v = qkv(b=8, h=4, lq=64, lk=64, d=32)
    g_out = torch.randn(8, 4, 64, 32)
    _, (gq, gk, gv) = run(lambda *t: attention(*t, spec=GRADS_ONLY, kernels=kernels()),
                          [q, k, v], g_out)
    ref_in = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    _, (rq, rk, rv) = run(lambda *t: attention(*t, spec=FULL, kernels=kernels()), ref_in, g_out)
    want_g = rounding_noise_db(g_out, 8)
    assert abs(sqnr_db(rv, gv) - want_g) < 1.5
    with torch.no_grad():  # dS of the fp32 step, for its own rounding noise
        p = torch.softmax(q @ k.mT / math.sqrt(32), -1)
        dp = g_out @ v.mT
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    want_s = -10 * math.log10(10 ** (-want_g / 10) + 10 ** (-row_noise_db(ds, 8) / 10))
    for ref, got in ((rq, gq), (rk, gk)):
        assert abs(sqnr_db(ref, got) - want_s) < 1.5


def test_the_backends_give_the_same_bits(backend):
    q, k, v = qkv()
    bias = torch.randn(1, 3, 17, 17).requires_grad_(True)
    g_out = torch.randn(2, 3, 17, 16)
    results = []
    for name in ("reference", backend):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
        torch.manual_seed(5)
        results.append(run(lambda *t, n=name: attention(*t, spec=Q8, kernels=Kernels(n)),
                           inputs, g_out))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_a_position_bias_takes_the_wgrad_copy_of_ds():
    """The bias's gradient sums dS over the batch: it comes from dS's 16-bit copy, whose
    rounding noise is 2^-16 of dS's range, so its SQNR is g's 8-bit one alone (a linear map of
    g keeps g's SQNR); from the 8-bit copy it would be dQ's, with both noises."""
    torch.manual_seed(1)
    q, k, v = qkv(b=8, h=4, lq=32, lk=32, d=16)
    bias = (torch.randn(1, 4, 32, 32) * 0.1).requires_grad_(True)
    g_out = torch.randn(8, 4, 32, 16)
    _, (_, _, _, gb) = run(lambda *t: attention(*t[:3], t[3], spec=GRADS_ONLY,
                                                kernels=kernels()), [q, k, v, bias], g_out)
    ref = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
    _, (_, _, _, rb) = run(lambda *t: attention(*t[:3], t[3], spec=FULL, kernels=kernels()),
                           ref, g_out)
    assert gb.shape == bias.shape
    assert abs(sqnr_db(rb, gb) - rounding_noise_db(g_out, 8)) < 1.5


class Attention(nn.Module):
    """Attention written both ways: SDPA, and the explicit matmul/softmax/matmul."""

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.fused = fused
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 2, 16).permute(2, 0, 3, 1, 4)
        if self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            x = (q @ k.transpose(-2, -1) / 4).softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(B, N, 32))


@pytest.mark.parametrize("fused", [True, False])
def test_quantize_model_runs_attention_products_in_8_bits(fused):
    torch.manual_seed(0)
    model = q8.quantize_model(nn.Sequential(Attention(fused), nn.Flatten(), nn.Linear(320, 4)),
                              q8.QuantConfig())
    assert type(model[0]).__name__ == "Q8Attention"
    assert ("0", "Attention", "Q8Attention") in model.q8_report.replaced
    report = q8.coverage(model, torch.randn(4, 10, 32))
    assert report.share("forward") == 1.0 and report.share("backward") == 1.0
    assert q8.dequantize_model(model) is model and type(model[0]) is Attention


def test_a_skipped_module_keeps_its_products_in_full_precision():
    model = q8.quantize_model(nn.Sequential(Attention(True)), q8.QuantConfig(skip=["0"]))
    assert type(model[0]) is Attention


def test_which_forwards_multiply_activations():
    assert multiplies_activations(Attention(True)) and multiplies_activations(Attention(False))
    assert not multiplies_activations(nn.Linear(2, 2))
    assert not multiplies_activations(nn.Sequential())


def test_a_vit_trains_with_every_gemm_in_8_bits():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                              num_classes=5)
    q8.quantize_model(model, q8.QuantConfig())
    report = q8.coverage(model, torch.randn(2, 3, 32, 32))
    assert report.share("forward") == 1.0 and report.share("backward") == 1.0
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)


class SE(nn.Module):
    """timm's squeeze-excitation shape: x * gate(...), the gate a child named `gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Conv2d(8, 8, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.fc(x.mean((2, 3), keepdim=True)))


def test_a_gate_keeps_its_input_as_8_bit_codes():
    """x * gate: the forward and dx = g * gate are exact; backward keeps x as uint8 codes, so
    d(gate) = sum of g * x_hat is off by at most sum |g| * s/2 (s: the step of x's grid)."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    gate = torch.rand(4, 8, 1, 1, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = QuantGateFn.apply(x, gate, 8, kernels())
    assert [t.dtype for t in saved if t.shape == x.shape] == [torch.uint8]
    assert torch.equal(y, x * gate)
    g = torch.randn_like(y)
    gx, ggate = torch.autograd.grad(y, (x, gate), g)
    assert torch.equal(gx, g * gate)
    exact = (g * x).sum((2, 3), keepdim=True)
    bound = g.abs().sum((2, 3), keepdim=True) * qparams(*minmax(x.detach()), 8)[0] / 2
    assert ((ggate - exact).abs() <= bound + 1e-6).all()
    assert not torch.equal(ggate, exact)  # x_hat, not x


def test_a_squeeze_excitation_module_becomes_a_gate_twin():
    model = q8.quantize_model(SE(), q8.QuantConfig())
    assert type(model).__name__ == "Q8SE" and model.q8_gates
    saved = []
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x)
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)


@pytest.mark.parametrize("gates", ["float", "8bit"])
def test_the_branch_of_a_gate_is_full_precision_unless_gates_is_8bit(gates):
    """gates="float" (the default): the branch computing the gate from pooled features (fc,
    sigmoid) keeps its classes and the report says why; "8bit": it is quantized too."""
    model = q8.quantize_model(nn.Sequential(nn.Conv2d(3, 8, 1), SE()), q8.QuantConfig(gates=gates))
    assert isinstance(model[0], q8.layers.QuantLayerMixin) and model[1].q8_gates
    why = "squeeze-excitation branch, in full precision (gates='float')"
    if gates == "float":
        assert (type(model[1].fc), type(model[1].gate)) == (nn.Conv2d, nn.Sigmoid)
        assert model.q8_report.kept == [("1.fc", "Conv2d", why), ("1.gate", "Sigmoid", why)]
        assert f"1 x Conv2d: {why}" in model.q8_report.summary()
    else:
        assert isinstance(model[1].fc, q8.layers.QuantLayerMixin)
        assert isinstance(model[1].gate, q8.layers.QuantActivationMixin)
        assert not model.q8_report.kept


# nothing quantized; norm="range" keeps quantize_model from skipping the model as full precision
# (there is no LayerNorm here for it to change)
NO_BITS = q8.QuantConfig(weight_bits=None, act_bits=None, grad_bits=None, wgrad_bits=None,
                         norm="range")


def mha_pair(config, **kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, **kw)
    twin = q8.quantize_model(nn.Sequential(nn.MultiheadAttention(16, 4, **kw)), config)[0]
    twin.load_state_dict(ref.state_dict())
    return ref, twin


@pytest.mark.parametrize("case", ["plain", "batch_first", "kdim", "padding", "bool_mask",
                                  "float_mask_3d", "no_weights", "per_head", "unbatched",
                                  "causal"])
def test_multihead_attention_at_full_precision_is_torch_s(case):
    """With nothing quantized the twin is nn.MultiheadAttention: outputs, returned weights and
    gradients, to fp32's rounding (sums of 16 products of O(1) values)."""
    kw = {"batch_first": case == "batch_first"}
    if case == "kdim":
        kw.update(kdim=8, vdim=12)
    ref, twin = mha_pair(NO_BITS, **kw)
    assert type(twin).__name__ == "Q8MultiheadAttention"
    g = torch.Generator().manual_seed(1)
    L, S, N = 5, 7, 3
    q = torch.randn((N, L, 16) if kw["batch_first"] else (L, N, 16), generator=g)
    k = torch.randn((S, N, kw.get("kdim", 16)), generator=g)
    v = torch.randn((S, N, kw.get("vdim", 16)), generator=g)
    if kw["batch_first"]:
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    call = {}
    if case == "padding":
        call["key_padding_mask"] = torch.tensor([[False] * 6 + [True]] * N)
    elif case == "bool_mask":
        call["attn_mask"] = torch.rand(L, S, generator=g) > 0.7
        call["attn_mask"][:, 0] = False  # every query attends somewhere
    elif case == "float_mask_3d":
        call["attn_mask"] = torch.randn(N * 4, L, S, generator=g)
    elif case == "no_weights":
        call["need_weights"] = False
    elif case == "per_head":
        call["average_attn_weights"] = False
    elif case == "unbatched":
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    elif case == "causal":
        q, k, v = q[:, :], q.clone(), q.clone()
        call.update(attn_mask=nn.Transformer.generate_square_subsequent_mask(L), is_causal=True)
    outs = []
    for module in (ref, twin):
        inputs = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, weights = module(*inputs, **call)
        out.backward(torch.ones_like(out))
        outs.append((out, weights, [t.grad for t in inputs],
                     [p.grad for p in module.parameters()]))
    (o1, w1, gi1, gp1), (o2, w2, gi2, gp2) = outs
    torch.testing.assert_close(o2, o1, rtol=0, atol=1e-5)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w2, w1, rtol=0, atol=1e-5)
    for a, b in zip(gi2 + gp2, gi1 + gp1):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_multihead_attention_runs_every_gemm_in_8_bits():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = q8.quantize_model(Net(), q8.QuantConfig())
    assert ("attn", "MultiheadAttention", "Q8MultiheadAttention") in model.q8_report.replaced
    report = q8.coverage(model, torch.randn(4, 12, 32))
    assert report.share("forward") == 1.0 and report.share("backward") == 1.0
    q8.dequantize_model(model)
    assert type(model.attn) is nn.MultiheadAttention
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_multihead_attention_with_bias_kv_is_left_alone_and_reported():
    model = q8.quantize_model(nn.Sequential(nn.MultiheadAttention(16, 4, add_bias_kv=True)),
                              q8.QuantConfig())
    assert type(model[0]) is nn.MultiheadAttention
    assert ("0", "MultiheadAttention", "add_bias_kv or add_zero_attn: no twin") in (
        model.q8_report.kept)
