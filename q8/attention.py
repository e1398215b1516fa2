"""Products of two activations in 8 bits: attention's QK^T and PV, and any `@` of activations.

    S = (Q_hat K_hat^T) * scale + bias      (bias: the attention mask, or a learnt position bias)
    P = softmax(S),  O = P_hat V_hat

Forward: Q, K, V and P are rounded to nearest on `act_bits` over their own [min, max]: Q, K
and V per tensor (the batch's range, in training and eval alike), P per row (per query). Softmax,
the scale and the bias stay in fp32. Backward, with the output gradient g quantized
stochastically to `grad_bits` per tensor, and dS per row:

    dV = P_hat^T g_hat,   dP = g_hat V_hat^T,   dS = P * (dP - rowsum(dP * P))
    dQ = dS_hat K_hat * scale,   dK = dS_hat^T Q_hat * scale,   d(bias) = dS_w

Bifurcation (Banner et al. 2018, sec. 5) splits a layer gradient between the data path, which
tolerates 8 bits, and the weight gradient, which sums over the batch and takes 16. A product of
two activations has no weight: dQ, dK and dV are all data path, so g and dS (the layer gradient
of QK^T) are quantized once, to `grad_bits`. The 16-bit copies are made upstream, by the q, k
and v projections from their own g_l. The one weight-like input is an additive bias that
requires grad (BEiT's and Swin's relative position bias, passed as a float mask): its gradient
is a sum of dS over the batch, so it takes dS's `wgrad_bits` copy, dS_w.

A gate (squeeze-excitation: x * sigmoid(...), the gate broadcast over x) multiplies in fp32
and keeps x as 8-bit codes for d(gate) = sum of g * x_hat (QuantGateFn): no GEMM, so g stays
as it is. The branch computing the gate is quantize_model's to convert or not (QuantConfig.gates).

Why per row: P and dS scale with each query's attention, most of a row near 0 and a few
entries large. One range per tensor leaves most entries a fraction of a step (SQNR of P about
23 dB, of dS about 17 dB, on ViT-Tiny's shapes: scripts/attention_sqnr.py); one per row gives
about 42 and 34 dB. A row's scale factors out of the sums over keys (PV, dS K); in the sums over
queries (P^T g, dS^T Q) the products run on the dequantized values, as every product here does.

Memory: Q, K and V are kept as 8-bit codes; P is recomputed in backward from them (the same
ops on the same codes give the same P), so nothing of size L x S is kept but a dropout mask.
The products run on the dequantized values in every GEMM mode.

A module whose own forward calls F.scaled_dot_product_attention, torch.matmul / bmm or `@`
becomes a Q8 twin (ProductMixin) whose forward runs these products; a product with a
Parameter (a weight GEMM written by hand) is left to the module, and q8.coverage reports it.
"""

from __future__ import annotations

import dis
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from q8.config import QuantConfig
from q8.functional import BifurcatedLayerFn, GradSpec, LayerSpec
from q8.kernels import Kernels
from q8.kernels.reference import fake_quant, minmax
from q8.layers import _IN_Q8_GEMM, WeightReaderMixin, in_q8_gemm


@dataclass(frozen=True)
class ProductSpec:
    """How a product of two activations is quantized: operand bits, and g_l's bits."""

    act_bits: int | None
    grad: GradSpec


def _quantize(k, x: Tensor, bits: int | None) -> tuple[Tensor, tuple[Tensor, ...]]:  # noqa: ANN001
    """x rounded to nearest over its own [min, max], and what backward keeps of it."""
    if bits is None or x.numel() == 0:
        return x, (x,)
    lo, hi = minmax(x.detach())
    return k.quantize_input(x, lo.float(), hi.float(), bits)


def _per_row(x: Tensor, bits: int | None, seed: Tensor | None = None) -> Tensor:
    """x quantized with one range per row (per query: the last dimension's [min, max]),
    rounded to nearest, or stochastically with `seed`."""
    if bits is None:
        return x
    return fake_quant(x, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), bits, seed)


def _reduce_to(t: Tensor, shape: torch.Size) -> Tensor:
    """The gradient of a broadcast operand: t summed over the dimensions broadcasting added."""
    return t if t.shape == shape else t.sum_to_size(shape)


class QuantMatmulFn(torch.autograd.Function):
    """a @ b for two activations (batched, broadcasting): 8-bit operands, an 8-bit g_l."""

    @staticmethod
    def forward(ctx, a, b, spec: ProductSpec, kernels: Kernels):  # noqa: ANN001, ANN205
        k = kernels.on(a)
        a_hat, saved_a = _quantize(k, a, spec.act_bits)
        b_hat, saved_b = _quantize(k, b, spec.act_bits)
        ctx.spec, ctx.kernels, ctx.n_a, ctx.shapes = spec, kernels, len(saved_a), (a.shape, b.shape)
        ctx.save_for_backward(*saved_a, *saved_b)
        return a_hat @ b_hat

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        k = ctx.kernels.on(gy)
        saved = ctx.saved_tensors
        a_hat, b_hat = k.restore(saved[: ctx.n_a]), k.restore(saved[ctx.n_a :])
        g = ctx.spec.grad.data_copy(k, gy)
        need_a, need_b = ctx.needs_input_grad[:2]
        ga = _reduce_to(g @ b_hat.mT, ctx.shapes[0]) if need_a else None
        gb = _reduce_to(a_hat.mT @ g, ctx.shapes[1]) if need_b else None
        return ga, gb, None, None


def _attention_bias(mask: Tensor | None, is_causal: bool, L: int, S: int,
                    like: Tensor) -> Tensor | None:
    """The additive bias of SDPA's `attn_mask` / `is_causal`: a float mask as it is, a boolean
    one (True = attend) and the causal mask (top-left aligned) as 0 / -inf."""
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
        mask = causal if mask is None else mask & causal
    if mask is None or mask.dtype != torch.bool:
        return mask
    return _blocked(~mask, like)


def _blocked(not_attended: Tensor, like: Tensor) -> Tensor:
    """A boolean mask as an additive bias in like's dtype: -inf where True, 0 elsewhere."""
    return torch.zeros(not_attended.shape, dtype=like.dtype, device=like.device).masked_fill(
        not_attended, float("-inf"))


class QuantAttentionFn(torch.autograd.Function):
    """softmax(Q K^T * scale + bias) V with 8-bit Q, K, V and P, and 8-bit g and dS in
    backward (the module docstring gives the formulas)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, dropout_p: float, scale: float,  # noqa: ANN001, ANN205
                spec: ProductSpec, kernels: Kernels):
        kr = kernels.on(q)
        q_hat, saved_q = _quantize(kr, q, spec.act_bits)
        k_hat, saved_k = _quantize(kr, k, spec.act_bits)
        v_hat, saved_v = _quantize(kr, v, spec.act_bits)
        p = torch.softmax(_scores(q_hat, k_hat, scale, bias), dim=-1)
        keep = None
        if dropout_p > 0:
            keep = torch.rand_like(p) >= dropout_p
            p = p * keep / (1 - dropout_p)
        p_hat = _per_row(p, spec.act_bits)
        ctx.spec, ctx.kernels, ctx.scale, ctx.dropout_p = spec, kernels, scale, dropout_p
        ctx.n = len(saved_q), len(saved_k), len(saved_v)
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(*saved_q, *saved_k, *saved_v, bias, keep)
        return p_hat @ v_hat

    @staticmethod
    def backward(ctx, gy):  # noqa: ANN001, ANN205
        spec: ProductSpec = ctx.spec
        kr = ctx.kernels.on(gy)
        saved = list(ctx.saved_tensors)
        nq, nk, nv = ctx.n
        q_hat = kr.restore(tuple(saved[:nq]))
        k_hat = kr.restore(tuple(saved[nq : nq + nk]))
        v_hat = kr.restore(tuple(saved[nq + nk : nq + nk + nv]))
        bias, keep = saved[nq + nk + nv :]
        # P exactly as forward made it, from the same codes
        p = torch.softmax(_scores(q_hat, k_hat, ctx.scale, bias), dim=-1)
        p_drop = p if keep is None else p * keep / (1 - ctx.dropout_p)
        p_hat = _per_row(p_drop, spec.act_bits)
        g = spec.grad.data_copy(kr, gy)
        gv = p_hat.mT @ g
        dp = g @ v_hat.mT
        if keep is not None:
            dp = dp * keep / (1 - ctx.dropout_p)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        need_bias = ctx.needs_input_grad[3]
        seed = spec.grad.seed()
        ds_data = _per_row(ds, spec.grad.bits, seed)
        gq = (ds_data @ k_hat) * ctx.scale
        gk = (ds_data.mT @ q_hat) * ctx.scale
        gb = _reduce_to(_per_row(ds, spec.grad.wbits, seed), ctx.bias_shape) if need_bias else None
        return gq, gk, gv, gb, None, None, None, None


def _scores(q_hat: Tensor, k_hat: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    s = (q_hat @ k_hat.mT) * scale
    return s if bias is None else s + bias


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, *, spec: ProductSpec, kernels: Kernels) -> Tensor:
    """F.scaled_dot_product_attention with 8-bit products (QuantAttentionFn): the same
    arguments, masks, causal flag and grouped-query heads."""
    L, S = q.shape[-2], k.shape[-2]
    if enable_gqa and k.shape[-3] != q.shape[-3]:  # each K/V head serves a group of Q heads
        group = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    bias = _attention_bias(attn_mask, is_causal, L, S, q)
    dtype = q.dtype
    y = QuantAttentionFn.apply(q.float(), k.float(), v.float(), bias, dropout_p, scale, spec,
                               kernels)
    return y.to(dtype)


class QuantGateFn(torch.autograd.Function):
    """x * gate, a gate broadcast over x (squeeze-excitation): exact in forward; backward keeps
    x as 8-bit codes, for d(gate) = sum of g * x_hat over the broadcast dimensions."""

    @staticmethod
    def forward(ctx, x, gate, bits: int, kernels: Kernels):  # noqa: ANN001, ANN205
        _, saved_x = _quantize(kernels.on(x), x, bits)
        ctx.kernels, ctx.n_x = kernels, len(saved_x)
        ctx.save_for_backward(*saved_x, gate)
        return x * gate

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        saved = ctx.saved_tensors
        x_hat, gate = ctx.kernels.on(g).restore(saved[: ctx.n_x]), saved[ctx.n_x]
        gx = g * gate if ctx.needs_input_grad[0] else None
        return gx, _reduce_to(g * x_hat, gate.shape), None, None


# ---- where products are found -----------------------------------------------------------

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
            torch.Tensor.bmm}
_MULS = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__}


def _gated(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor] | None:
    """(x, gate) where one operand broadcasts over the other with fewer elements, else None."""
    if a.numel() < b.numel():
        a, b = b, a
    if b.numel() < a.numel() and torch.broadcast_shapes(a.shape, b.shape) == a.shape:
        return a, b
    return None


def _is_activation(t: object) -> bool:
    """A float tensor of at least 2 dims that is not a Parameter, nor a view of one."""
    return (isinstance(t, Tensor) and t.is_floating_point() and t.dim() >= 2
            and not isinstance(t, nn.Parameter) and not isinstance(t._base, nn.Parameter))


class _QuantProducts(TorchFunctionMode):
    """Inside a ProductMixin twin's forward: SDPA and matmul/bmm of two activations run in
    8 bits. A product inside a q8 GEMM, or with a Parameter, runs as it is."""

    def __init__(self, module: ProductMixin) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if not _IN_Q8_GEMM[0]:
            spec, kernels = self.module.q8_product, self.module.q8_kernels
            if func is F.scaled_dot_product_attention:
                return _counted(attention, *args, **kwargs, spec=spec, kernels=kernels)
            if func in _MATMULS and len(args) == 2 and not kwargs and all(
                    _is_activation(t) for t in args):
                a, b = args
                dtype = torch.promote_types(a.dtype, b.dtype)
                y = _counted(QuantMatmulFn.apply, a.float(), b.float(), spec, kernels)
                return y.to(dtype)
            if (func in _MULS and self.module.q8_gates and spec.act_bits is not None
                    and len(args) == 2 and not kwargs and all(_is_activation(t) for t in args)
                    and args[0].dtype == args[1].dtype == torch.float32):
                pair = _gated(*args)
                if pair is not None:
                    return QuantGateFn.apply(*pair, spec.act_bits, kernels)
        return func(*args, **kwargs)


def _counted(fn, *args, **kwargs):  # noqa: ANN001, ANN202
    """fn run as a q8 GEMM, in float32 with autocast off: products inside it run as they
    are."""
    with in_q8_gemm(), torch.autocast(args[0].device.type, enabled=False):
        return fn(*args, **kwargs)


class ProductMixin:
    """A module whose own forward multiplies activations (attention): its forward runs
    SDPA and matmul/bmm/@ of two activations in 8 bits (module docstring)."""

    twin_prefix = "Q8"

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        grad = GradSpec(config.grad_bits, config.wgrad_bits, config.grad_rounding)
        self.q8_product = ProductSpec(config.act_bits, grad)
        self.q8_kernels = kernels
        self.q8_gates = is_gate(self)

    def forward(self, *args, **kwargs) -> object:
        with _QuantProducts(self):
            return super().forward(*args, **kwargs)


class MultiheadAttentionMixin(ProductMixin):
    """nn.MultiheadAttention in 8 bits: the q, k, v projections as bifurcated 8-bit GEMMs on
    slices of `in_proj_weight` (or the separate q/k/v weights), the attention as `attention`,
    `out_proj` as its QuantLinear twin. Its arguments keep their meaning: `batch_first`,
    unbatched input, `key_padding_mask` and `attn_mask` (boolean: True = not attended; or
    additive), `is_causal`, dropout. The weights it returns with `need_weights` are softmax's
    of the quantized Q and K, without a gradient. `add_bias_kv` and `add_zero_attn` are not
    supported (quantize_model leaves such a module alone)."""

    def _q8_setup(self, config: QuantConfig, kernels: Kernels) -> None:
        super()._q8_setup(config, kernels)
        grad = GradSpec(config.grad_bits, config.wgrad_bits, config.grad_rounding)
        self.q8_proj = LayerSpec(config.act_bits, config.weight_bits,
                                 config.per_channel_weights, grad, config.gemm)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,  # noqa: PLR0913
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        query, key, value = (t.float() for t in (query, key, value))  # fp32 under autocast
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (L, N, E), S, H = query.shape, key.shape[0], self.num_heads
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        q, k, v = (self._q8_project(x, w, b).reshape(len(x), N * H, -1).transpose(0, 1)
                   .reshape(N, H, len(x), -1)
                   for x, w, b in zip((query, key, value), weights, biases))
        bias = _mha_bias(attn_mask, key_padding_mask, is_causal, N, H, L, S, q)
        dropout = self.dropout if self.training else 0.0
        out = _counted(attention, q, k, v, bias, dropout, spec=self.q8_product,
                       kernels=self.q8_kernels)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E))
        weights = None
        if need_weights:
            with torch.no_grad():
                p = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]) +
                                  (0 if bias is None else bias), -1)
                weights = p.mean(1) if average_attn_weights else p
                weights = weights[0] if unbatched else weights
        if unbatched:
            return out[:, 0], weights
        return (out.transpose(0, 1) if self.batch_first else out), weights

    def _q8_project(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """x W^T + b as a bifurcated 8-bit GEMM over x's own range."""
        lo, hi = (None, None) if self.q8_proj.act_bits is None else minmax(x.detach())
        return _counted(BifurcatedLayerFn.apply, x, weight, bias, lo, hi, self.q8_proj,
                        self.q8_kernels)


def _mha_bias(attn_mask: Tensor | None, key_padding_mask: Tensor | None, is_causal: bool,
              N: int, H: int, L: int, S: int, like: Tensor) -> Tensor | None:
    """MultiheadAttention's masks as one additive bias of shape (N or 1, H or 1, L, S): a
    boolean True is a position not attended (-inf), a float mask is added."""
    def additive(mask: Tensor) -> Tensor:
        return _blocked(mask, like) if mask.dtype == torch.bool else mask.to(like.dtype)

    bias = None
    if attn_mask is not None:
        bias = additive(attn_mask)
        bias = bias.view(N, H, L, S) if bias.dim() == 3 else bias.view(1, 1, L, S)
    elif is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=like.device).tril()
        bias = additive(~causal).view(1, 1, L, S)
    if key_padding_mask is not None:
        pad = additive(key_padding_mask).view(N, 1, 1, S)
        bias = pad if bias is None else bias + pad
    return bias


def supports_mha(module: nn.Module) -> bool:
    """Whether MultiheadAttentionMixin runs this nn.MultiheadAttention."""
    return (isinstance(module, nn.MultiheadAttention) and module.bias_k is None
            and not module.add_zero_attn)


class ProductWeightReaderMixin(ProductMixin, WeightReaderMixin):
    """Both: its forward multiplies activations and hands a twin's weight to F.linear (timm's
    BEiT and EVA attention)."""


_PRODUCT_NAMES = {"scaled_dot_product_attention", "matmul", "bmm"}
_MATMUL_OPS = {"@", "@="}


def _own_forward(module: nn.Module) -> object:
    """The forward of `module`'s own class, not of a q8 twin's mixin."""
    return next(c.forward for c in type(module).__mro__
                if "forward" in vars(c) and not c.__module__.startswith("q8."))


def multiplies_activations(module: nn.Module) -> bool:
    """Whether `module`'s own forward calls SDPA, matmul or bmm, or uses `@`, or is a gate
    (is_gate): it may multiply two activations (decided per call, in _QuantProducts)."""
    code = getattr(_own_forward(module), "__code__", None)
    if code is None:
        return False
    if _PRODUCT_NAMES & set(code.co_names):
        return True
    return any(ins.opname == "BINARY_OP" and ins.argrepr in _MATMUL_OPS
               for ins in dis.get_instructions(code)) or is_gate(module)


def is_gate(module: nn.Module) -> bool:
    """A gating module: a child named `gate` (timm's squeeze-excitation, ECA and CBAM
    modules) and a `*` in its own forward, x * gate(...)."""
    code = getattr(_own_forward(module), "__code__", None)
    return (code is not None and isinstance(getattr(module, "gate", None), nn.Module)
            and any(ins.opname == "BINARY_OP" and ins.argrepr in ("*", "*=")
                    for ins in dis.get_instructions(code)))
