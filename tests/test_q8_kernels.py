"""q8's kernel backends against the reference, op by op, and how a backend is chosen.

Every op of `cpu` and `cuda` does the reference's float operations in its order, and Range BN's
sums are exact sums of integers: each result must equal the reference's to the bit (NaN at the
same places). `cuda` runs here under Triton's interpreter when there is no GPU
(tests/conftest.py), on small tensors.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import pickle
import shutil
import warnings

import pytest
import torch
import torch.utils._python_dispatch
from torch import nn

import q8
import q8.kernels as kernels
from q8 import QuantConfig, quantize_model
from q8.kernels import BackendUnavailable, Kernels, load
from q8.kernels.reference import Reference, codes, minmax, qparams
from tests.conftest import BACKENDS, backend_params, cuda_kernels, device_of

REF = Reference()
FAST = [b for b in BACKENDS if b != "reference"]  # the backends held to the reference
SEEDS = [None, 0, 0x2545F4914F6CDD1D]


def same(a, b) -> bool:
    """Equal to the bit, or both NaN at the same places; None only with None."""
    if a is None or b is None:
        return a is None and b is None
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        a, b = a.detach().cpu(), b.detach().cpu()
        nan = a.isnan()
        if not torch.equal(nan, b.isnan()):
            return False
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a[~nan].contiguous().view(bits), b[~nan].contiguous().view(bits))
    return torch.equal(a.cpu(), b.cpu())


def all_same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(all_same(x, y) for x, y in zip(a, b))
    return same(a, b)


def _values(shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    flat[::7] = 0.0  # exact zeros, as ReLU's backward makes
    flat[3::11] = -0.0
    return x


def layouts(x):
    """x as a contiguous tensor, channels_last (4-d) and a transposed (non-contiguous) view."""
    yield x
    if x.dim() == 4:
        yield x.to(memory_format=torch.channels_last)
    if x.dim() >= 2:
        yield x.transpose(-1, -2).contiguous().transpose(-1, -2)


SHAPES = [(1,), (13,), (3, 5), (2, 3, 4), (4, 6, 5, 7), (1, 3, 1, 1), (2, 8, 2, 2)]


@pytest.fixture(params=backend_params(FAST))
def fast(request):
    return request.param


def on(backend, x):
    return x.to(device_of(backend))


# ---- elementwise ops: bit for bit ----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_input_codes_and_x_hat(fast, shape, bits):
    k = load(fast)
    for scale in (1e-3, 1.0, 1e3):
        for x in layouts(_values(shape, bits, scale)):
            x = on(fast, x)
            lo, hi = minmax(x)
            want = REF.quantize_input(x, lo, hi, bits)
            got = k.quantize_input(x, lo, hi, bits)
            assert all_same(got, want)
            assert same(k.restore(got[1]), REF.restore(want[1]))
            # a range narrower than x: codes clip at both ends
            assert all_same(k.quantize_input(x, lo / 2, hi / 3, bits),
                            REF.quantize_input(x, lo / 2, hi / 3, bits))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits,wbits", [(8, 16), (8, 8), (8, None), (4, 12), (2, 2)])
def test_grad_pair(fast, shape, bits, wbits):
    k = load(fast)
    for x in layouts(_values(shape, 1, 1e-3)):
        x = on(fast, x)
        for seed in SEEDS:
            for need in ((True, True), (True, False), (False, True)):
                want = REF.grad_pair(x, bits, wbits, seed, *need)
                got = k.grad_pair(x, bits, wbits, seed, *need)
                assert all_same(got, want), (seed, need)


def test_grad_pair_on_a_large_tensor_crosses_the_kernels_blocks(fast):
    g = on(fast, _values((40_003,), 2, 1e-3))  # not a multiple of a block or of 8
    for seed in SEEDS:
        assert all_same(load(fast).grad_pair(g, 8, 16, seed), REF.grad_pair(g, 8, 16, seed))


@pytest.mark.parametrize("bits,wbits", [(8, 16), (8, 8), (8, None), (4, 12), (12, 12)])
def test_gemm_operands(fast, bits, wbits):
    """The centred codes q - z the GEMM modes multiply (q8.gemm), with scale and zero point."""
    k = load(fast)
    for x in layouts(_values((4, 6, 5, 7), 11)):
        x = on(fast, x)
        saved = REF.quantize_input(x, *minmax(x), 8)[1]
        assert all_same(k.restore_codes(saved), REF.restore_codes(saved))
        w = x[0].clone()
        qp = REF.quantize_weight(w, bits, True)[1]
        assert all_same(k.weight_codes(w, bits, qp), REF.weight_codes(w, bits, qp))
        for seed in SEEDS:
            for need in ((True, True), (True, False), (False, True)):
                assert all_same(k.grad_pair_codes(x * 1e-3, bits, wbits, seed, *need),
                                REF.grad_pair_codes(x * 1e-3, bits, wbits, seed, *need))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # NumPy, in Triton's interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(fast, bad):
    k = load(fast)
    x = on(fast, _values((4, 6, 5, 7)))
    x[1, 2, 3, 4] = bad
    lo, hi = minmax(x)
    assert same(k.quantize_input(x, lo, hi, 8)[0], REF.quantize_input(x, lo, hi, 8)[0])
    for seed in (None, 5):
        assert all_same(k.grad_pair(x, 8, 16, seed), REF.grad_pair(x, 8, 16, seed))
    assert all_same(k.quantize_weight(x, 8, True), REF.quantize_weight(x, 8, True))
    assert all_same(k.relu(x.clone(), False), REF.relu(x.clone(), False))


def _weight_cases():
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(16, 3, 3, 3, generator=g) * 10.0**e for e in (-30, -3, 0, 3, 30)]
    cases += [torch.rand(64, 9, generator=g) + 0.5, -torch.rand(64, 9, generator=g) - 0.5,
              torch.full((8, 5), -2.5), torch.full((8, 5), 3.0), torch.zeros(8, 5),
              torch.randn(64, 9, generator=g).round(), torch.randn(1, 1, generator=g),
              torch.randn(10, 33, generator=g)]
    for _ in range(5):  # ranges whose ends fall on or near grid points
        x = torch.randint(-300, 300, (32, 17), generator=g).float() / 7
        cases.append(x + torch.randn(32, 17, generator=g) * 1e-6)
    return cases


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weights(fast, bits, per_channel):
    k = load(fast)
    for w in _weight_cases():
        w = on(fast, w)
        want = REF.quantize_weight(w, bits, per_channel)
        got = k.quantize_weight(w, bits, per_channel)
        assert all_same(got, want)
        assert same(k.requantize_weight(w, bits, got[1]), want[0])


@pytest.mark.parametrize("shape", SHAPES + [(3, 1001)])
@pytest.mark.parametrize("inplace", [False, True])
def test_relu_and_its_mask(fast, shape, inplace):
    k = load(fast)
    base = _values(shape, 3)
    base.view(-1)[0] = float("nan")  # passes through ReLU, its flag is off (NaN > 0 is false)
    for x in layouts(base):
        x = on(fast, x)
        want = REF.relu(x.clone(), inplace)
        got = k.relu(x.clone(), inplace)
        assert all_same(got, want)
        gy = on(fast, _values(x.shape, 4))
        gy.view(-1)[1:2] = float("nan")
        assert same(k.relu_backward(gy, got[1]), REF.relu_backward(gy, want[1]))


@pytest.mark.parametrize("geometry", [((3, 3), (2, 2), (1, 1), (1, 1), False),
                                      ((2, 3), (1, 2), (1, 0), (1, 1), False),
                                      ((3, 3), (2, 2), (0, 0), (2, 2), True)])
def test_max_pool(fast, geometry):
    k = load(fast)
    x = on(fast, _values((2, 3, 11, 13), 5))
    want, got = REF.max_pool(x, geometry), k.max_pool(x, geometry)
    assert all_same(got, want)
    gy = on(fast, _values(want[0].shape, 6))
    assert same(k.max_pool_backward(gy, got[1], x.shape, geometry),
                REF.max_pool_backward(gy, want[1], x.shape, geometry))


# ---- Range BN's passes: exact sums, so bit for bit too ----------------------------------------


@pytest.mark.parametrize("shape", [(4, 6, 5, 7), (7, 3, 1, 1), (2, 8, 2, 2), (3, 5, 11),
                                   (1, 4, 40, 41)])
def test_range_bn_passes(fast, shape):
    k = load(fast)
    for x in layouts(_values(shape, 7) * 3 + 1):
        x = on(fast, x)
        lo, hi = minmax(x)
        want = REF.range_bn_stats(x, lo, hi, 8)
        got = k.range_bn_stats(x, lo, hi, 8)
        assert all_same(got, want)
        saved, _, smin, smax = want
        C = shape[1]
        a, b = on(fast, torch.randn(C)), on(fast, torch.randn(C))
        assert same(k.range_bn_affine(got[0], a, b), REF.range_bn_affine(saved, a, b))
        mean = on(fast, torch.randn(C) * 0.1)
        w_max, w_min = on(fast, torch.randn(shape[:2])), on(fast, torch.randn(shape[:2]))
        for gy in layouts(_values(shape, 8, 1e-3)):
            gy = on(fast, gy)
            for seed in SEEDS:
                sums = REF.range_bn_grad_sums(saved, gy, mean, smax, smin, 8, seed)
                assert all_same(k.range_bn_grad_sums(got[0], gy, mean, smax, smin, 8, seed),
                                sums)
                args = (*sums[4:], 8, seed, a, b, smax, smin, w_max, w_min)
                assert same(k.range_bn_grad_input(got[0], gy, *args),
                            REF.range_bn_grad_input(saved, gy, *args))


def test_range_bn_sums_are_the_exact_sums(fast):
    """The per-plane sums of x_hat = (q - z) s are s * sum(q - z) rounded once: against the
    sum of the float64 values of x_hat, they differ by the rounding of each x_hat (2^-24
    relative) and the final rounding, never by the order of summation."""
    x = on(fast, _values((6, 4, 9, 9), 9) * 2)
    lo, hi = minmax(x)
    (codes, scale, zero_point), total, _, _ = load(fast).range_bn_stats(x, lo, hi, 8)
    x_hat = load(fast).restore((codes, scale, zero_point)).double().flatten(2)
    bound = 2.0**-24 * (x_hat.abs().sum(-1) + total.double().abs())
    assert ((total.double() - x_hat.sum(-1)).abs() <= bound).all()


@pytest.mark.q8_backend("cpu")
def test_results_do_not_depend_on_the_thread_count():
    k = load("cpu")
    x = _values((64, 32, 8, 8), 10)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            saved, *stats = k.range_bn_stats(x, *minmax(x), 8)
            out.append((stats, k.grad_pair(x, 8, 16, 7),
                        k.range_bn_grad_sums(saved, x * 1e-3, stats[0][0], stats[2], stats[1],
                                             8, 7)))
    finally:
        torch.set_num_threads(threads)
    assert all_same(out[0], out[1])


# ---- whole steps: the same loss and gradients on every backend ---------------------------------


def _tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 16, 3, padding=1, groups=2), nn.BatchNorm2d(16),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


# Range BN runs on the fused kernels, the default BN on torch's; one range per tensor, as the
# kernels take (a range per channel runs the reference's quantize_input)
PAPER = QuantConfig(bn="range", act_ranges="tensor")


def _step(backend, config=None, model=_tiny_net, shape=(8, 3, 12, 12)):
    import dataclasses

    config = config or PAPER
    dev = device_of(backend)
    m = quantize_model(model(), dataclasses.replace(config, backend=backend)).to(dev)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dev)
    y = torch.randint(0, 10, (shape[0],), generator=g).to(dev)
    torch.manual_seed(2)  # the rounding noise's seeds
    loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    return [loss] + [p.grad for p in m.parameters()] + [b for b in m.buffers()]


@pytest.mark.parametrize("config", [PAPER, QuantConfig(bn="batchnorm", bn_compute="8bit"),
                                    QuantConfig(),
                                    QuantConfig(wgrad_bits=None, per_channel_weights=True),
                                    QuantConfig(gemm="codes"), QuantConfig(gemm="int8")],
                         ids=["paper", "batchnorm", "default", "fp32-wgrad", "codes", "int8"])
def test_a_training_step_is_the_same_on_every_backend(fast, config):
    """Loss, every gradient and every buffer (running statistics and ranges) to the bit."""
    assert all_same(_step(fast, config), _step("reference", config))


@pytest.mark.q8_backend("cpu")
def test_a_resnet_step_is_the_same_on_the_cpu_backend():
    import timm

    def resnet():
        torch.manual_seed(0)
        return timm.create_model("resnet18", num_classes=10)

    assert all_same(_step("cpu", model=resnet, shape=(4, 3, 32, 32)),
                    _step("reference", model=resnet, shape=(4, 3, 32, 32)))


class _CountCpuOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the calls of each q8_cpu op."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "q8_cpu":
            self.calls[func._opname] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_cuda_kernels(monkeypatch):
    """Counts the launches of each Triton kernel of q8.kernels.cuda."""
    cuda = cuda_kernels()
    calls = collections.Counter()

    class Counted:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            calls[self.name.lstrip("_")] += 1
            return self.kernel[grid]

    for name in ("_quantize_input", "_dequantize", "_grad_pair", "_relu", "_relu_backward",
                 "_range_bn_stats", "_range_bn_affine", "_range_bn_grad_sums",
                 "_range_bn_grad_input"):
        monkeypatch.setattr(cuda, name, Counted(name, getattr(cuda, name)))
    yield calls


def test_a_training_step_runs_the_fused_kernels(fast, monkeypatch):
    """Every op that a fused backend fuses runs its kernel in a training step, once per layer
    that calls it: a guard that sent them to the reference would fail here, though the results
    would still be the reference's to the bit."""
    model = _tiny_net()
    gemms = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    relus = sum(isinstance(m, nn.ReLU) for m in model.modules())
    per_layer = {"quantize_input": gemms, "dequantize": gemms, "grad_pair": gemms,
                 "range_bn_stats": norms, "range_bn_affine": norms,
                 "range_bn_grad_sums": norms, "range_bn_grad_input": norms,
                 "relu_backward": relus}
    if fast == "cpu":
        counter = _CountCpuOps()
        with counter:
            _step("cpu", model=lambda: model)
        calls = counter.calls
        # the weights: W_hat in forward, again in backward; ReLU in place or not
        per_layer |= {"quantize_weight": gemms, "requantize_weight": gemms}
        calls["relu"] += calls.pop("relu_")
    else:
        with _count_cuda_kernels(monkeypatch) as calls:
            _step(fast, model=lambda: model)
    per_layer["relu"] = relus
    assert dict(calls) == per_layer


# ---- edge cases: empty, non-contiguous, a batch of one, too large -----------------------------


def _layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


@pytest.mark.parametrize("bn", ["range", "batchnorm"])
def test_an_empty_batch_gives_empty_outputs_and_leaves_the_statistics(backend, bn):
    dev = device_of(backend)
    m = quantize_model(_layers(), QuantConfig(bn=bn, backend=backend)).to(dev)
    x = torch.randn(4, 3, 6, 6, device=dev)
    m(x)  # the running statistics and ranges have values
    before = copy.deepcopy(m.state_dict())
    empty = torch.zeros(0, 3, 6, 6, device=dev, requires_grad=True)
    y = m(empty)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert empty.grad.shape == empty.shape
    for p in m.parameters():
        assert p.grad is None or not p.grad.any()
    after = m.state_dict()
    for key, value in before.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(after[key], value), key


@pytest.mark.parametrize("backend_name", backend_params(BACKENDS))
def test_empty_tensors_on_every_op(backend_name):
    k = load(backend_name)
    x = on(backend_name, torch.zeros(0, 3, 4, 4))
    lo, hi = minmax(x)
    assert k.quantize_input(x, lo, hi, 8)[0].shape == x.shape
    assert all(t.shape == x.shape for t in k.grad_pair(x, 8, 16, 3))
    assert k.relu(x, False)[0].shape == x.shape and k.relu(x, False)[1].numel() == 0
    saved, s, mn, mx = k.range_bn_stats(x, lo, hi, 8)
    assert s.shape == mn.shape == mx.shape == (0, 3)
    w = on(backend_name, torch.zeros(0, 3))
    assert k.quantize_weight(w, 8, False)[0].shape == w.shape


def test_a_batch_of_one_and_non_contiguous_inputs_train(backend):
    dev = device_of(backend)
    for x in (torch.randn(1, 3, 6, 6), torch.randn(2, 6, 6, 3).permute(0, 3, 1, 2),
              torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)):
        m = quantize_model(_layers(), QuantConfig(backend=backend)).to(dev)
        x = x.to(dev).requires_grad_(True)
        m(x).sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.shape == x.shape


@pytest.mark.parametrize("backend_name", backend_params(BACKENDS))
def test_more_than_2_to_31_elements_is_refused_clearly(backend_name):
    """An expanded tensor has 2^31 elements and no memory: refused before any kernel runs."""
    big = on(backend_name, torch.zeros(1)).expand(2**31)
    with pytest.raises(ValueError, match=r"2,147,483,648 elements .*\(2\^31 - 1\)"):
        Kernels(backend_name).on(big)
    relu = quantize_model(nn.Sequential(nn.ReLU()), QuantConfig(backend=backend_name))
    leaf = on(backend_name, torch.zeros(1)).requires_grad_(True)
    with pytest.raises(ValueError, match="use a smaller batch"):
        relu(leaf.expand(2**31))


@pytest.mark.q8_backend("cpu")
def test_the_cpu_kernels_check_their_arguments():
    """Called directly with sizes that do not fit, the C++ ops raise; they never read out of
    bounds."""
    ops = load("cpu").ops
    x = torch.randn(2, 3, 4, 4)
    codes, scale, zp, _, mn, mx = ops.range_bn_stats(x, *minmax(x), 8)
    stat = torch.zeros(2, 3)
    bad = [
        lambda: ops.range_bn_stats(torch.zeros(0, 3, 4, 4), *minmax(x), 8),  # empty
        lambda: ops.range_bn_stats(x, *minmax(x), 9),  # codes of 9 bits in uint8
        lambda: ops.range_bn_stats(x.transpose(2, 3), *minmax(x), 8),  # not contiguous
        lambda: ops.range_bn_stats(x.double(), *minmax(x), 8),  # not float32
        lambda: ops.range_bn_affine(codes, scale, zp, torch.zeros(2), torch.zeros(3)),
        lambda: ops.range_bn_grad_sums(codes, scale, zp, x, torch.zeros(3), torch.zeros(5),
                                       stat, 8, None),
        lambda: ops.range_bn_grad_sums(codes[:1], scale, zp, x, torch.zeros(3), stat, stat, 8,
                                       None),
        lambda: ops.range_bn_grad_input(codes, scale, zp, x, *minmax(x), 8, None,
                                        torch.zeros(3), torch.zeros(3), stat, stat, stat,
                                        torch.zeros(1)),
        lambda: ops.relu_backward(torch.randn(100), torch.zeros(3, dtype=torch.uint8)),
        lambda: ops.relu(torch.randn(100).double()),
        lambda: ops.grad_pair(x, 8, 16, torch.zeros(2, dtype=torch.int64), True, True),  # seed
        lambda: ops.grad_pair(x, 8, 16, torch.zeros((), dtype=torch.int32), True, True),
        lambda: ops.requantize_weight(torch.randn(4, 3), 8, torch.ones(2), torch.zeros(2)),
        lambda: ops.quantize_weight(torch.zeros(0, 3), 8, True),
        lambda: ops.quantize_input(x, torch.zeros(2), torch.ones(()), 8),
        lambda: ops.grad_pair(x, 1, 16, None, True, True),
        lambda: ops.dequantize(codes, torch.ones(3), zp),
    ]
    for call in bad:
        with pytest.raises(RuntimeError, match="q8 CPU kernel"):
            call()


@pytest.mark.q8_backend("cuda")
def test_the_cuda_kernels_check_the_sizes_they_index():
    k = load("cuda")
    x = on("cuda", torch.randn(2, 3, 4, 4))
    saved, _, mn, mx = k.range_bn_stats(x, *minmax(x), 8)
    C, stat = on("cuda", torch.zeros(3)), on("cuda", torch.zeros(2, 3))
    bad = [
        lambda: k.ops.quantize_input(x, on("cuda", torch.zeros(2)), on("cuda", torch.ones(())),
                                     8),
        lambda: k.relu_backward(x, on("cuda", torch.zeros(3, dtype=torch.uint8))),
        lambda: k.range_bn_affine(saved, on("cuda", torch.zeros(2)), C),
        lambda: k.range_bn_grad_sums(saved, x, C, on("cuda", torch.zeros(5)), stat, 8, None),
        lambda: k.range_bn_grad_sums(saved, x[:1], C, mx[:1], mn[:1], 8, None),
        lambda: k.range_bn_grad_input(saved, x, *minmax(x), 8, None, C, C, stat, stat, stat,
                                      on("cuda", torch.zeros(1))),
    ]
    for call in bad:
        with pytest.raises(ValueError, match="q8 cuda kernel"):
            call()


# ---- choosing a backend ---------------------------------------------------------------------


def test_the_cpu_backend_builds_where_a_compiler_is():
    """CI's machine has a C++ compiler: the kernels must build there (a failure fails here, it
    does not skip)."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    try:
        load("cpu")
    except BackendUnavailable as e:
        pytest.fail(f"a C++ compiler is here, but {e}")


def test_auto_picks_the_device_s_backend_and_layers_carry_it():
    model = quantize_model(_layers(), QuantConfig())
    layers = [m for m in model.modules() if hasattr(m, "q8_kernels")]
    assert len(layers) == 5 and len({id(m.q8_kernels) for m in layers}) == 1
    chosen = layers[0].q8_kernels.on(torch.zeros(1))
    assert chosen.name == ("cpu" if _cpu_builds() else "reference")


def _cpu_builds() -> bool:
    try:
        load("cpu")
    except BackendUnavailable:
        return False
    return True


@pytest.mark.q8_backend("cuda")
def test_an_unavailable_backend_named_explicitly_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cuda_kernels(), "INTERPRET", False)
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.raises(BackendUnavailable, match="backend 'cuda' needs a CUDA GPU"):
        quantize_model(_layers(), QuantConfig(backend="cuda"))


def test_a_backend_does_not_run_on_another_device_s_tensors():
    k = Kernels("reference")
    assert k.on(torch.zeros(1)).name == "reference"
    if torch.cuda.is_available() and _cpu_builds():
        with pytest.raises(ValueError, match="backend 'cpu' does not run on cuda tensors"):
            Kernels("cpu").on(torch.zeros(1, device="cuda"))


def test_auto_falls_back_to_the_reference_when_the_kernels_do_not_build(monkeypatch):
    def no_compiler():
        raise RuntimeError("c++: not found")

    monkeypatch.setattr("q8.kernels.cpu.build", no_compiler)
    monkeypatch.setattr(kernels, "_loaded", {})
    with pytest.warns(UserWarning, match=r"could not be built \(RuntimeError: c\+\+: not found\)"):
        assert Kernels("auto").on(torch.zeros(1)).name == "reference"
    with pytest.raises(BackendUnavailable, match="could not be built"):
        Kernels("cpu")
    m = quantize_model(_layers(), QuantConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(torch.randn(2, 3, 6, 6)).sum().backward()  # trains on the reference's ops


def test_use_backend_swaps_every_layer_for_a_block():
    model = quantize_model(_layers(), QuantConfig())
    before = [m.q8_kernels for m in model.modules() if hasattr(m, "q8_kernels")]
    with q8.use_backend(model, "reference"):
        inside = {m.q8_kernels.backend for m in model.modules() if hasattr(m, "q8_kernels")}
        model(torch.randn(2, 3, 6, 6))
    assert inside == {"reference"}
    assert [m.q8_kernels for m in model.modules() if hasattr(m, "q8_kernels")] == before


def test_a_quantized_model_pickles_and_deep_copies_with_its_backend():
    model = quantize_model(_layers(), QuantConfig(backend="reference"))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layers = [m for m in clone.modules() if hasattr(m, "q8_kernels")]
        assert {m.q8_kernels.backend for m in layers} == {"reference"}
        x = torch.randn(2, 3, 6, 6)
        assert torch.equal(clone.eval()(x), model.eval()(x))


@pytest.mark.parametrize("bits", [9, 12, 16])
def test_codes_of_more_than_8_bits_come_as_two_exact_bytes(bits):
    """q - z = 256 hi + lo, hi in [-256, 255] and lo in [0, 255], both bf16 (exact there)."""
    g = _values((4, 6, 5, 7), 12)
    g[0, 0, 0, 0], g[0, 0, 0, 1] = g.min() - 1, g.max() + 1  # the range's ends: codes 0, top
    for seed in SEEDS:
        _, w = REF.grad_pair_codes(g, 8, bits, seed)
        assert w.values.dtype == w.low.dtype == torch.bfloat16
        scale, zero_point = qparams(*minmax(g), bits)
        assert torch.equal(w.scale, scale) and torch.equal(w.zero_point, zero_point)
        centred = codes(g, scale, zero_point, bits, seed) - zero_point
        assert torch.equal(w.values.double() * 256 + w.low.double(), centred.double())
        assert w.low.min() >= 0 and w.low.max() <= 255
        assert w.values.min() >= -256 and w.values.max() <= 255
        assert centred.abs().max() > 256  # both bytes are used
