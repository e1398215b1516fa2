// q8's fused CPU kernels: each q8 layer's elementwise chain in one or two passes over memory.
//
// Eager PyTorch runs every step of a quantizer (min/max, divide, add noise, floor, clamp,
// rescale, cast) as its own pass and its own dispatcher call; these kernels run the chain per
// element, in every core (at::parallel_for), with the noise for stochastic rounding computed in
// place from the counter-based hash of the element index and a seed, so that it needs neither a
// serial generator nor memory.
//
// Each op is the op of the same name in q8/kernels/reference.py, element by element and in the
// same float operations, so the results are the reference's to the bit (Range BN's sums are
// sums of integers, exact in any order). q8/kernels/cpu.py calls them with contiguous float32
// CPU tensors; every op checks its arguments (device, dtype, layout, sizes) and raises a
// c10::Error, never reading out of bounds. Codes are uint8 (<= 8 bits).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace {

using at::Tensor;

constexpr int64_t kGrain = 1 << 15;  // elements per task: below this, one thread

// ---- the quantizer ------------------------------------------------------------------------

// qparams(lo, hi, bits) of the reference: scale s, zero point z, and the top code 2^B - 1.
struct Grid {
  float scale, zero_point, top;
};

Grid make_grid(float lo, float hi, int64_t bits) {
  const float lo0 = lo > 0 ? 0.0f : lo;  // clamp(max=0): keeps -0.0 and NaN
  const float hi0 = hi < 0 ? 0.0f : hi;
  const float span = hi0 - lo0;
  const float constant = span == 0 ? 1.0f : span;  // a NaN range keeps a NaN scale
  const float scale = hi > lo ? span / float((int64_t(1) << bits) - 2) : constant;
  return {scale, std::ceil(-lo0 / scale), float((int64_t(1) << bits) - 1)};
}

// U[0, 1) at 24-bit resolution from the lowbias32 hash of (index + seed) mod 2^32.
inline float hash_uniform(int64_t index, int64_t seed) {
  uint32_t h = static_cast<uint32_t>(static_cast<uint64_t>(index) + static_cast<uint64_t>(seed));
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return float(h >> 8) * (1.0f / 16777216.0f);
}

inline float clamp_nan(float y, float lo, float hi) {  // NaN passes, as torch.clamp
  return y < lo ? lo : (y > hi ? hi : y);
}

// The code q = clamp(y + z, 0, 2^B - 1) of y = round(x / s) (or floor(x / s + u)), as a float.
inline float code(float y, const Grid& g) { return clamp_nan(y + g.zero_point, 0.0f, g.top); }

// y = round(x / s) (or floor(x / s + u)) as a centred code: clamp(y + z, 0, 2^B - 1) - z,
// computed as clamp(y, lo = -z, hi = 2^B - 1 - z) + 0, the same float (y, z and the bounds are integers,
// the sums exact; adding +0 turns the clamp's -0 into the reference's +0).
inline float centred(float y, float lo, float hi) { return clamp_nan(y, lo, hi) + 0.0f; }

// out[i] = x_hat of x[i] = (q - z) * s for i < n, rounding to nearest (half to even, as
// torch.round) or stochastically: floor(x/s + u), u from element base + i's hash. Simple
// loops, so that the compiler vectorizes them.
void fake_quant_run(const float* __restrict x, float* __restrict out, int64_t n, const Grid& g,
                    bool stochastic, int64_t base, int64_t seed) {
  const float s = g.scale, lo = -g.zero_point, hi = g.top - g.zero_point;
  if (stochastic) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = centred(std::floor(x[i] / s + hash_uniform(base + i, seed)), lo, hi) * s;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = centred(std::nearbyint(x[i] / s), lo, hi) * s;
  }
}

// out[i] = q - z of x[i]: the integer of x_hat = (q - z) * s, as a float (exact: |q - z| < 2^16).
void centred_code_run(const float* __restrict x, float* __restrict out, int64_t n, const Grid& g,
                      bool stochastic, int64_t base, int64_t seed) {
  const float s = g.scale, lo = -g.zero_point, hi = g.top - g.zero_point;
  if (stochastic) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = centred(std::floor(x[i] / s + hash_uniform(base + i, seed)), lo, hi);
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = centred(std::nearbyint(x[i] / s), lo, hi);
  }
}

// codes[i] = q of x[i], nearest, and x_hat[i] = (q - z) * s.
void codes_run(const float* __restrict x, uint8_t* __restrict codes, float* __restrict x_hat,
               int64_t n, const Grid& g) {
  const float s = g.scale, z = g.zero_point;
  for (int64_t i = 0; i < n; ++i) {
    const float q = code(std::nearbyint(x[i] / s), g);
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(q == q ? q : 0.0f));  // NaN: 0
    x_hat[i] = (q - z) * s;
  }
}

void dequantize_run(const uint8_t* __restrict codes, float* __restrict out, int64_t n, float s,
                    float z) {
  for (int64_t i = 0; i < n; ++i) out[i] = (float(codes[i]) - z) * s;
}

// Exact sums of integer-valued floats, in any order: 8 float lanes (which the compiler
// vectorizes), each adding at most `block` terms before it is flushed into a double, where
// block * (the largest |term|) <= 2^24 keeps every float partial sum an exact integer. NaN
// propagates.
int64_t exact_block(double largest_term) {
  return std::max<int64_t>(1, int64_t(16777216.0 / std::max(largest_term, 1.0)));
}

// sum of term(i) for i < n, exactly, for integer-valued float terms of at most 2^24 / block.
template <typename Term>
double exact_sum_of(int64_t n, int64_t block, Term term) {
  double total = 0;
  int64_t i = 0;
  while (i + 8 <= n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t end = std::min(n - (n - i) % 8, i + 8 * block);
    for (; i < end; i += 8)
      for (int j = 0; j < 8; ++j) acc[j] += term(i + j);
    for (int j = 0; j < 8; ++j) total += acc[j];
  }
  for (; i < n; ++i) total += term(i);
  return total;
}

double exact_sum(const float* __restrict v, int64_t n, int64_t block) {
  return exact_sum_of(n, block, [v](int64_t k) { return v[k]; });
}

// sum of a[i] * b[i], exactly, for integer-valued a, b whose products |a b| are at most
// 2^24 / block.
double exact_dot(const float* __restrict a, const float* __restrict b, int64_t n,
                 int64_t block) {
  return exact_sum_of(n, block, [a, b](int64_t k) { return a[k] * b[k]; });
}

// sum of codes[0, n), exactly (in int64 lanes: 255 n < 2^63).
int64_t code_sum(const uint8_t* __restrict codes, int64_t n) {
  int64_t total = 0, i = 0;
#ifdef __AVX2__  // vpsadbw: the sum of each 8 bytes into a 64-bit lane
  __m256i acc = _mm256_setzero_si256();
  const __m256i zero = _mm256_setzero_si256();
  for (; i + 32 <= n; i += 32)
    acc = _mm256_add_epi64(acc, _mm256_sad_epu8(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + i)), zero));
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  total = lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
  for (; i < n; ++i) total += codes[i];
  return total;
}

// Min and max of v[0, n), n >= 1; both NaN if any value is (as torch.aminmax).
std::pair<float, float> lane_minmax(const float* __restrict v, int64_t n) {
  float l = v[0], h = v[0];
  bool bad = false;
  int64_t i = 0;
#ifdef __AVX2__  // GCC does not vectorize this reduction by itself
  if (n >= 8) {
    __m256 lo = _mm256_loadu_ps(v), hi = lo, nan = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
      const __m256 x = _mm256_loadu_ps(v + i);
      lo = _mm256_min_ps(x, lo), hi = _mm256_max_ps(x, hi);  // a NaN x keeps lo, hi
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    alignas(32) float los[8], his[8];
    _mm256_store_ps(los, lo), _mm256_store_ps(his, hi);
    for (int j = 0; j < 8; ++j) l = std::min(l, los[j]), h = std::max(h, his[j]);
    bad = _mm256_movemask_ps(nan) != 0;
  }
#endif
  for (; i < n; ++i) l = std::min(l, v[i]), h = std::max(h, v[i]), bad |= v[i] != v[i];
  if (bad || l != l) l = h = std::numeric_limits<float>::quiet_NaN();
  return {l, h};
}

Tensor scalar(float v) { return at::scalar_tensor(v, at::kFloat); }

// Min and max of n floats (NaN if any is), over blocks in every core; (0, 0) for n = 0, as
// the reference's minmax.
std::pair<float, float> aminmax(const float* x, int64_t n) {
  if (n == 0) return {0.0f, 0.0f};
  const int64_t blocks = (n + kGrain - 1) / kGrain;
  std::vector<float> lo(blocks), hi(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      std::tie(lo[k], hi[k]) = lane_minmax(x + k * kGrain, std::min(kGrain, n - k * kGrain));
  });
  auto [l, h] = lane_minmax(lo.data(), blocks);
  return {l, lane_minmax(hi.data(), blocks).second};
}

void check(const Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(),
              "q8 CPU kernel: ", name, " must be a contiguous CPU tensor of ", dtype);
}

void check_bits(int64_t bits, int64_t most) {
  TORCH_CHECK(bits >= 2 && bits <= most, "q8 CPU kernel: bits must be in 2..", most, ", got ",
              bits);
}

void check_numel(const Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(t.numel() == numel, "q8 CPU kernel: ", name, " must have ", numel,
              " elements, has ", t.numel());
}

// A scalar argument (scale, zero point, range end): one float32 value on the CPU.
float scalar_arg(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == 1,
              "q8 CPU kernel: ", name, " must be one float32 value on the CPU");
  return *t.const_data_ptr<float>();
}

// The stochastic rounding's seed: one int64 value on the CPU (0 when rounding to nearest).
int64_t seed_arg(const std::optional<Tensor>& seed) {
  if (!seed.has_value()) return 0;
  TORCH_CHECK(seed->device().is_cpu() && seed->scalar_type() == at::kLong && seed->numel() == 1,
              "q8 CPU kernel: seed must be one int64 value on the CPU");
  return *seed->const_data_ptr<int64_t>();
}

// An activation of Range BN: (B, C, ...) with at least one value.
void check_planes(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() >= 2 && t.numel() > 0, "q8 CPU kernel: ", name,
              " must be a non-empty (B, C, ...) tensor");
}

// A per-plane statistic (B, C) of x, or a per-channel one (C) when per_plane is false.
void check_stat(const Tensor& t, const Tensor& x, bool per_plane, const char* name) {
  check(t, at::kFloat, name);
  check_numel(t, per_plane ? x.size(0) * x.size(1) : x.size(1), name);
}

// Over planes p = (sample, channel) of `spatial` values each, in blocks of whole planes of at
// least kBlock values: body(first plane, end plane, spatial, scratch of 2 block sizes). The
// elementwise work runs over a whole block (vectorized even for 1x1 planes), the per-plane
// reductions over each plane's slice of it.
constexpr int64_t kBlock = 1024;

template <typename F>
void for_planes(const Tensor& t, F body) {
  const int64_t planes = t.size(0) * t.size(1), spatial = t.numel() / planes;
  const int64_t per_block = std::max<int64_t>(1, kBlock / std::max<int64_t>(spatial, 1));
  at::parallel_for(0, planes, std::max<int64_t>(per_block, kGrain / std::max<int64_t>(spatial, 1)),
                   [&](int64_t b, int64_t e) {
    std::vector<float> scratch(2 * per_block * spatial);
    for (int64_t p = b; p < e; p += per_block)
      body(p, std::min(e, p + per_block), spatial, scratch.data());
  });
}

// ---- layer gradients: g_l for dL/dx (bits) and its copy for dL/dW (wbits) -----------------

// grad_pair of the reference, both copies quantized: one min/max pass and one pass writing
// both copies with the same noise. A copy not needed is None; with bits == wbits one tensor
// serves both paths.
std::tuple<std::optional<Tensor>, std::optional<Tensor>> grad_pair(
    const Tensor& g, int64_t bits, int64_t wbits, const std::optional<Tensor>& seed_,
    bool need_data, bool need_weight) {
  check(g, at::kFloat, "g");
  const bool stochastic = seed_.has_value();
  const int64_t seed = seed_arg(seed_);
  check_bits(bits, 16);
  check_bits(wbits, 16);
  const int64_t n = g.numel();
  const float* pg = g.const_data_ptr<float>();
  auto [lo, hi] = aminmax(pg, n);
  const bool shared = bits == wbits;
  Tensor d = need_data || shared ? at::empty_like(g) : Tensor();
  Tensor w = need_weight && !shared ? at::empty_like(g) : Tensor();
  const Grid gd = make_grid(lo, hi, bits), gw = make_grid(lo, hi, wbits);
  float* pd = d.defined() ? d.mutable_data_ptr<float>() : nullptr;
  float* pw = w.defined() ? w.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
    if (pd) fake_quant_run(pg + b, pd + b, e - b, gd, stochastic, b, seed);
    if (pw) fake_quant_run(pg + b, pw + b, e - b, gw, stochastic, b, seed);
  });
  std::optional<Tensor> data, weight;  // never one tensor twice: an op's outputs do not alias
  if (need_data || shared) data = d;
  if (need_weight && !shared) weight = w;
  return {data, weight};
}

// ---- activations ---------------------------------------------------------------------------

// A range per channel: lo and hi (or scale and zero point) hold one value per channel of t,
// (N, C, ...) contiguous; returns the size of a (sample, channel) plane, which takes its
// channel's range.
int64_t plane_size(const Tensor& t, const Tensor& a, const Tensor& b, const char* what) {
  TORCH_CHECK(t.dim() >= 2 && a.numel() == t.size(1) && b.numel() == a.numel() &&
                  a.is_contiguous() && b.is_contiguous() && a.scalar_type() == at::kFloat &&
                  b.scalar_type() == at::kFloat && a.device().is_cpu() && b.device().is_cpu(),
              "q8 CPU kernel: ", what, " must be one float32 value, or one per channel of dim 1");
  return t.numel() == 0 ? 0 : t.numel() / (t.size(0) * t.size(1));
}

// quantize_input: nearest rounding over [lo, hi], one range or one per channel ->
// (codes, x_hat, scale, zero point), scale and zero point shaped as lo.
std::tuple<Tensor, Tensor, Tensor, Tensor> quantize_input(const Tensor& x, const Tensor& lo,
                                                          const Tensor& hi, int64_t bits) {
  check(x, at::kFloat, "x");
  check_bits(bits, 8);
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  Tensor x_hat = at::empty_like(x);
  const float* px = x.const_data_ptr<float>();
  uint8_t* pc = codes.mutable_data_ptr<uint8_t>();
  float* ph = x_hat.mutable_data_ptr<float>();
  if (lo.numel() == 1 && hi.numel() == 1) {
    const Grid gr = make_grid(scalar_arg(lo, "lo"), scalar_arg(hi, "hi"), bits);
    at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
      codes_run(px + b, pc + b, ph + b, e - b, gr);
    });
    return {codes, x_hat, scalar(gr.scale), scalar(gr.zero_point)};
  }
  const int64_t C = lo.numel(), inner = plane_size(x, lo, hi, "lo and hi");
  Tensor scale = at::empty(lo.sizes(), lo.options()), zero_point = at::empty_like(scale);
  std::vector<Grid> grids(C);
  const float *pl = lo.const_data_ptr<float>(), *pu = hi.const_data_ptr<float>();
  float *ps = scale.mutable_data_ptr<float>(), *pz = zero_point.mutable_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    grids[c] = make_grid(pl[c], pu[c], bits);
    ps[c] = grids[c].scale, pz[c] = grids[c].zero_point;
  }
  const int64_t planes = inner == 0 ? 0 : x.numel() / inner;
  at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, inner)),
                   [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      codes_run(px + p * inner, pc + p * inner, ph + p * inner, inner, grids[p % C]);
  });
  return {codes, x_hat, scale, zero_point};
}

// (code - z) * s, with one (s, z) or one per channel
Tensor dequantize(const Tensor& codes, const Tensor& scale, const Tensor& zero_point) {
  check(codes, at::kByte, "codes");
  Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* pc = codes.const_data_ptr<uint8_t>();
  float* po = out.mutable_data_ptr<float>();
  if (scale.numel() == 1 && zero_point.numel() == 1) {
    const float s = scalar_arg(scale, "scale"), z = scalar_arg(zero_point, "zero_point");
    at::parallel_for(0, codes.numel(), kGrain, [&](int64_t b, int64_t e) {
      dequantize_run(pc + b, po + b, e - b, s, z);
    });
    return out;
  }
  const int64_t C = scale.numel();
  const int64_t inner = plane_size(codes, scale, zero_point, "scale and zero_point");
  const float *ps = scale.const_data_ptr<float>(), *pz = zero_point.const_data_ptr<float>();
  const int64_t planes = inner == 0 ? 0 : codes.numel() / inner;
  at::parallel_for(0, planes, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, inner)),
                   [&](int64_t b, int64_t e) {
    for (int64_t p = b; p < e; ++p)
      dequantize_run(pc + p * inner, po + p * inner, inner, ps[p % C], pz[p % C]);
  });
  return out;
}

// ---- weights ----------------------------------------------------------------------------------

// W_hat = (q - z) * s, nearest, with one (s, z) per row of w (output channel) or one for all.
Tensor requantize_weight(const Tensor& w, int64_t bits, const Tensor& scale,
                         const Tensor& zero_point) {
  check(w, at::kFloat, "w");
  check(scale, at::kFloat, "scale");
  check(zero_point, at::kFloat, "zero_point");
  check_bits(bits, 16);
  const int64_t rows = scale.numel();
  TORCH_CHECK(w.dim() >= 1 && (rows == 1 || rows == w.size(0)) && zero_point.numel() == rows,
              "q8 CPU kernel: one scale and zero point for w, or one per row of w");
  Tensor out = at::empty_like(w);
  const int64_t cols = rows == 0 ? 0 : w.numel() / rows;
  if (w.numel() == 0) return out;
  const float* pw = w.const_data_ptr<float>();
  const float *ps = scale.const_data_ptr<float>(), *pz = zero_point.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  const float top = float((int64_t(1) << bits) - 1);
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r)
      fake_quant_run(pw + r * cols, po + r * cols, cols, Grid{ps[r], pz[r], top}, false, 0, 0);
  });
  return out;
}

// quantize_weight: (s, z) from W's own range (per output channel or whole), then W_hat.
std::tuple<Tensor, Tensor, Tensor> quantize_weight(const Tensor& w, int64_t bits,
                                                   bool per_channel) {
  check(w, at::kFloat, "w");
  check_bits(bits, 16);
  TORCH_CHECK(w.dim() >= 1 && w.numel() > 0, "q8 CPU kernel: w must be a non-empty tensor");
  const int64_t rows = per_channel ? w.size(0) : 1, cols = w.numel() / rows;
  std::vector<int64_t> shape(w.dim(), 1);
  if (per_channel) shape[0] = rows;
  auto opt = w.options();
  Tensor scale = per_channel ? at::empty(shape, opt) : at::empty({}, opt);
  Tensor zero_point = per_channel ? at::empty(shape, opt) : at::empty({}, opt);
  const float* pw = w.const_data_ptr<float>();
  float *ps = scale.mutable_data_ptr<float>(), *pz = zero_point.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      auto [lo, hi] = per_channel ? lane_minmax(pw + r * cols, cols) : aminmax(pw, cols);
      const Grid g = make_grid(lo, hi, bits);
      ps[r] = g.scale, pz[r] = g.zero_point;
    }
  });
  return {requantize_weight(w, bits, scale, zero_point), scale, zero_point};
}

// ---- ReLU: the output and a mask of 1 bit per element (bit i of byte k: element 8k + i) ------

// y = relu(x) into `out` (x itself for an in-place ReLU); returns the mask of y > 0.
Tensor relu_into(const Tensor& x, const Tensor& out) {
  check(x, at::kFloat, "x");
  check(out, at::kFloat, "out");
  check_numel(out, x.numel(), "out");
  const int64_t n = x.numel(), bytes = (n + 7) / 8;
  Tensor packed = at::empty({bytes}, x.options().dtype(at::kByte));
  const float* px = x.const_data_ptr<float>();
  float* py = out.mutable_data_ptr<float>();
  uint8_t* pp = packed.mutable_data_ptr<uint8_t>();
  at::parallel_for(0, bytes, kGrain / 8, [&](int64_t b, int64_t e) {
    const int64_t end = std::min(8 * e, n);
    for (int64_t i = 8 * b; i < end; ++i) py[i] = px[i] < 0 ? 0.0f : px[i];  // NaN passes
    int64_t k = b;
#ifdef __AVX2__
    for (; k < e && 8 * k + 8 <= n; ++k)  // bit j of the byte = lane j of the comparison
      pp[k] = uint8_t(_mm256_movemask_ps(
          _mm256_cmp_ps(_mm256_loadu_ps(py + 8 * k), _mm256_setzero_ps(), _CMP_GT_OQ)));
#endif
    for (; k < e; ++k) {
      uint8_t m = 0;
      for (int64_t i = 8 * k; i < std::min(8 * k + 8, n); ++i) m |= uint8_t(py[i] > 0) << (i - 8 * k);
      pp[k] = m;
    }
  });
  return packed;
}

// gx = gy where the mask is set, else 0.
Tensor relu_backward(const Tensor& gy, const Tensor& packed) {
  check(gy, at::kFloat, "gy");
  check(packed, at::kByte, "packed");
  const int64_t n = gy.numel();
  check_numel(packed, (n + 7) / 8, "packed");
  Tensor gx = at::empty_like(gy);
  const float* pg = gy.const_data_ptr<float>();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  float* po = gx.mutable_data_ptr<float>();
  at::parallel_for(0, (n + 7) / 8, kGrain / 8, [&](int64_t b, int64_t e) {
    int64_t k = b;
#ifdef __AVX2__
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (; k < e && 8 * k + 8 <= n; ++k) {
      const __m256i m = _mm256_and_si256(_mm256_set1_epi32(pp[k]), bit);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, bit));
      _mm256_storeu_ps(po + 8 * k, _mm256_and_ps(keep, _mm256_loadu_ps(pg + 8 * k)));
    }
#endif
    for (int64_t i = 8 * k; i < std::min(8 * e, n); ++i)
      po[i] = (pp[i >> 3] >> (i & 7)) & 1 ? pg[i] : 0.0f;
  });
  return gx;
}

// ---- Range BN ---------------------------------------------------------------------------------

// Forward: codes of x over [lo, hi] and, per plane of x_hat, its sum, min and max.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> range_bn_stats(
    const Tensor& x, const Tensor& lo, const Tensor& hi, int64_t bits) {
  check(x, at::kFloat, "x");
  check_planes(x, "x");
  check_bits(bits, 8);
  const int64_t B = x.size(0), C = x.size(1);
  const Grid gr = make_grid(scalar_arg(lo, "lo"), scalar_arg(hi, "hi"), bits);
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  Tensor sum = at::empty({B, C}, x.options()), mn = at::empty({B, C}, x.options()),
         mx = at::empty({B, C}, x.options());
  const float* px = x.const_data_ptr<float>();
  uint8_t* pc = codes.mutable_data_ptr<uint8_t>();
  float *ps = sum.mutable_data_ptr<float>(), *pl = mn.mutable_data_ptr<float>(),
        *ph = mx.mutable_data_ptr<float>();
  for_planes(x, [&](int64_t p0, int64_t p1, int64_t n, float* x_hat) {
    const int64_t at = p0 * n;
    codes_run(px + at, pc + at, x_hat, (p1 - p0) * n, gr);
    for (int64_t p = p0; p < p1; ++p) {
      // sum of x_hat = s * sum(q - z), exactly (the reference's Range BN sums)
      const double q_sum = double(code_sum(pc + p * n, n)) - double(n) * double(gr.zero_point);
      ps[p] = float(q_sum * double(gr.scale));
      std::tie(pl[p], ph[p]) = lane_minmax(x_hat + (p - p0) * n, n);
    }
  });
  return {codes, scalar(gr.scale), scalar(gr.zero_point), sum, mn, mx};
}

// y = a * x_hat + b per channel, x_hat from its codes.
Tensor range_bn_affine(const Tensor& codes, const Tensor& scale, const Tensor& zero_point,
                       const Tensor& a, const Tensor& b) {
  check(codes, at::kByte, "codes");
  check_planes(codes, "codes");
  check_stat(a, codes, false, "a");
  check_stat(b, codes, false, "b");
  const int64_t C = codes.size(1);
  const float s = scalar_arg(scale, "scale"), z = scalar_arg(zero_point, "zero_point");
  const float *pa = a.const_data_ptr<float>(), *pb = b.const_data_ptr<float>();
  Tensor y = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* pc = codes.const_data_ptr<uint8_t>();
  float* py = y.mutable_data_ptr<float>();
  for_planes(codes, [&](int64_t p0, int64_t p1, int64_t n, float*) {
    for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
      const float ap = pa[c], bp = pb[c];
      for (int64_t i = p * n; i < (p + 1) * n; ++i) py[i] = ((float(pc[i]) - z) * s) * ap + bp;
    }
  });
  return y;
}

// Backward, pass 1: g = gy quantized to `bits` over gy's range, and per plane the sums of g
// and of g * (x_hat - mean), and the number of values at the chunk's max and min. Also returns
// gy's range, from which range_bn_grad_input rebuilds the same g.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> range_bn_grad_sums(
    const Tensor& codes, const Tensor& scale, const Tensor& zero_point, const Tensor& gy,
    const Tensor& mean, const Tensor& t_max, const Tensor& t_min, int64_t bits,
    const std::optional<Tensor>& seed_) {
  check(codes, at::kByte, "codes");
  const bool stochastic = seed_.has_value();
  const int64_t seed = seed_arg(seed_);
  check(gy, at::kFloat, "gy");
  check_planes(gy, "gy");
  TORCH_CHECK(codes.sizes() == gy.sizes(), "q8 CPU kernel: codes and gy must have one shape");
  check_stat(mean, gy, false, "mean");
  check_stat(t_max, gy, true, "t_max");
  check_stat(t_min, gy, true, "t_min");
  check_bits(bits, 16);
  const int64_t B = gy.size(0), C = gy.size(1);
  const float s = scalar_arg(scale, "scale"), z = scalar_arg(zero_point, "zero_point");
  const float* pg = gy.const_data_ptr<float>();
  auto [glo, ghi] = aminmax(pg, gy.numel());
  const Grid gr = make_grid(glo, ghi, bits);
  const float *pm = mean.const_data_ptr<float>(), *ptx = t_max.const_data_ptr<float>(),
              *ptn = t_min.const_data_ptr<float>();
  auto opt = gy.options();
  Tensor sg = at::empty({B, C}, opt), sgx = at::empty({B, C}, opt), nmax = at::empty({B, C}, opt),
         nmin = at::empty({B, C}, opt);
  float *psg = sg.mutable_data_ptr<float>(), *psgx = sgx.mutable_data_ptr<float>(),
        *pnx = nmax.mutable_data_ptr<float>(), *pnn = nmin.mutable_data_ptr<float>();
  const uint8_t* pc = codes.const_data_ptr<uint8_t>();
  const double gs = gr.scale;
  // |q_g - z_g| <= 2^bits - 1 and |q - z| <= 255: the float lanes' block lengths
  const double g_top = double((int64_t(1) << bits) - 1);
  const int64_t g_block = exact_block(g_top), gx_block = exact_block(g_top * 255);
  for_planes(gy, [&](int64_t p0, int64_t p1, int64_t n, float* buf) {
    const int64_t at = p0 * n, len = (p1 - p0) * n;
    float *dg = buf, *dx = buf + len;  // q_g - z_g and q - z of each value
    centred_code_run(pg + at, dg, len, gr, stochastic, at, seed);
    for (int64_t i = 0; i < len; ++i) dx[i] = float(pc[at + i]) - z;
    for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
      const float *gp = dg + (p - p0) * n, *xp = dx + (p - p0) * n;
      // x_hat == t: x_hat = (q - z) * s, compared as the reference compares floats
      const float hi_t = ptx[p], lo_t = ptn[p];
      int64_t cx = 0, cn = 0;
      for (int64_t i = 0; i < n; ++i) {
        const float v = xp[i] * s;
        cx += v == hi_t, cn += v == lo_t;
      }
      pnx[p] = float(cx), pnn[p] = float(cn);
      const double sum_g = exact_sum(gp, n, g_block), sum_gx = exact_dot(gp, xp, n, gx_block);
      psg[p] = float(gs * sum_g);
      psgx[p] = float(gs * (double(s) * sum_gx - double(pm[c]) * sum_g));
    }
  });
  return {sg, sgx, nmax, nmin, scalar(glo), scalar(ghi)};
}

// Backward, pass 2: dL/dx = a * (g - g_mean) + w_max where x is its chunk's max - w_min where
// x is its chunk's min; g rebuilt from gy, its range and the seed.
Tensor range_bn_grad_input(const Tensor& codes, const Tensor& scale, const Tensor& zero_point,
                           const Tensor& gy, const Tensor& g_lo, const Tensor& g_hi, int64_t bits,
                           const std::optional<Tensor>& seed_, const Tensor& a,
                           const Tensor& g_mean, const Tensor& t_max, const Tensor& t_min,
                           const Tensor& w_max, const Tensor& w_min) {
  check(codes, at::kByte, "codes");
  const bool stochastic = seed_.has_value();
  const int64_t seed = seed_arg(seed_);
  check(gy, at::kFloat, "gy");
  check_planes(gy, "gy");
  TORCH_CHECK(codes.sizes() == gy.sizes(), "q8 CPU kernel: codes and gy must have one shape");
  check_stat(a, gy, false, "a");
  check_stat(g_mean, gy, false, "g_mean");
  for (const Tensor* t : {&t_max, &t_min, &w_max, &w_min}) check_stat(*t, gy, true, "a statistic");
  check_bits(bits, 16);
  const int64_t C = gy.size(1);
  const float s = scalar_arg(scale, "scale"), z = scalar_arg(zero_point, "zero_point");
  const Grid gr = make_grid(scalar_arg(g_lo, "g_lo"), scalar_arg(g_hi, "g_hi"), bits);
  const float *pa = a.const_data_ptr<float>(), *pgm = g_mean.const_data_ptr<float>(),
              *ptx = t_max.const_data_ptr<float>(), *ptn = t_min.const_data_ptr<float>(),
              *pwx = w_max.const_data_ptr<float>(), *pwn = w_min.const_data_ptr<float>();
  const float* pg = gy.const_data_ptr<float>();
  const uint8_t* pc = codes.const_data_ptr<uint8_t>();
  Tensor gx = at::empty_like(gy);
  float* po = gx.mutable_data_ptr<float>();
  for_planes(gy, [&](int64_t p0, int64_t p1, int64_t n, float* x) {
    const int64_t at = p0 * n;
    fake_quant_run(pg + at, po + at, (p1 - p0) * n, gr, stochastic, at, seed);
    dequantize_run(pc + at, x, (p1 - p0) * n, s, z);
    for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
      float *out = po + p * n, *xp = x + (p - p0) * n;
      const float ap = pa[c], mp = pgm[c], hi_t = ptx[p], lo_t = ptn[p],
                  wxp = pwx[p], wnp = pwn[p];
      for (int64_t i = 0; i < n; ++i)
        out[i] = (out[i] - mp) * ap + (xp[i] == hi_t ? wxp : 0.0f) - (xp[i] == lo_t ? wnp : 0.0f);
    }
  });
  return gx;
}

// ReLU as two ops: y and the mask from x; or x itself made y (x.relu_()), returning the mask.
std::tuple<Tensor, Tensor> relu(const Tensor& x) {
  Tensor y = at::empty_like(x);
  Tensor packed = relu_into(x, y);
  return {y, packed};
}

Tensor relu_(const Tensor& x) { return relu_into(x, x); }

}  // namespace

// The schemas, and the CPU kernels behind them (q8/kernels/cpu.py registers the fake
// implementations that torch.compile traces).
TORCH_LIBRARY(q8_cpu, m) {
  m.def("grad_pair(Tensor g, int bits, int wbits, Tensor? seed, bool need_data, "
        "bool need_weight) -> (Tensor?, Tensor?)");
  m.def("quantize_input(Tensor x, Tensor lo, Tensor hi, int bits) -> (Tensor, Tensor, Tensor, "
        "Tensor)");
  m.def("dequantize(Tensor codes, Tensor scale, Tensor zero_point) -> Tensor");
  m.def("quantize_weight(Tensor w, int bits, bool per_channel) -> (Tensor, Tensor, Tensor)");
  m.def("requantize_weight(Tensor w, int bits, Tensor scale, Tensor zero_point) -> Tensor");
  m.def("relu(Tensor x) -> (Tensor, Tensor)");
  m.def("relu_(Tensor(a!) x) -> Tensor");
  m.def("relu_backward(Tensor gy, Tensor packed) -> Tensor");
  m.def("range_bn_stats(Tensor x, Tensor lo, Tensor hi, int bits) -> (Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)");
  m.def("range_bn_affine(Tensor codes, Tensor scale, Tensor zero_point, Tensor a, Tensor b) -> "
        "Tensor");
  m.def("range_bn_grad_sums(Tensor codes, Tensor scale, Tensor zero_point, Tensor gy, "
        "Tensor mean, Tensor t_max, Tensor t_min, int bits, Tensor? seed) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("range_bn_grad_input(Tensor codes, Tensor scale, Tensor zero_point, Tensor gy, "
        "Tensor g_lo, Tensor g_hi, int bits, Tensor? seed, Tensor a, Tensor g_mean, "
        "Tensor t_max, Tensor t_min, Tensor w_max, Tensor w_min) -> Tensor");
}

TORCH_LIBRARY_IMPL(q8_cpu, CPU, m) {
  m.impl("grad_pair", grad_pair);
  m.impl("quantize_input", quantize_input);
  m.impl("dequantize", dequantize);
  m.impl("quantize_weight", quantize_weight);
  m.impl("requantize_weight", requantize_weight);
  m.impl("relu", relu);
  m.impl("relu_", relu_);
  m.impl("relu_backward", relu_backward);
  m.impl("range_bn_stats", range_bn_stats);
  m.impl("range_bn_affine", range_bn_affine);
  m.impl("range_bn_grad_sums", range_bn_grad_sums);
  m.impl("range_bn_grad_input", range_bn_grad_input);
}
