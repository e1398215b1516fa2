// q8's fused CPU kernels: each q8 layer's elementwise chain in one or two passes over memory.
//
// Eager PyTorch runs every step of a quantizer (min/max, divide, add noise, floor, clamp,
// rescale, cast) as its own pass and its own dispatcher call; these kernels run the chain per
// element, in both cores (at::parallel_for), with the noise for stochastic rounding computed in
// place from a counter-based hash of the element index and a seed (q8.quantizer.uniform_hash,
// the same noise as the torch.compile path), so it needs neither a serial generator nor memory.
//
// The maths is q8/quantizer.py's, element by element; tests/test_q8_cpu_kernels.py checks each
// op against the PyTorch reference. Inputs are contiguous float32 CPU tensors (q8/cpu_kernels.py
// checks that before calling); codes are uint8 (<= 8 bits).

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

// qparams(lo, hi, bits) of q8/quantizer.py, and the clamp of fake_quant: codes minus the zero
// point, clamp(y, -z, 2^B - 1 - z), times the scale.
struct Grid {
  float scale, zero_point, lo, hi;
};

Grid make_grid(float lo, float hi, int bits) {
  const float lo0 = lo > 0 ? 0.0f : lo;  // clamp(max=0): keeps -0.0 and NaN
  const float hi0 = hi < 0 ? 0.0f : hi;
  const float span = hi0 - lo0;
  const float constant = span == 0 ? 1.0f : span;  // a NaN range keeps a NaN scale
  const float scale = hi > lo ? span / float((1 << bits) - 2) : constant;
  const float z = std::ceil(-lo0 / scale);
  return {scale, z, -z, float((1 << bits) - 1) - z};
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

// out[i] = fake_quant(x[i]) = clamp(round(x/s), -z, 2^B-1-z) * s for i < n, rounding to
// nearest (half to even, as torch.round) or stochastic: floor(x/s + u), u from element
// base + i's hash. Simple loops, so that the compiler vectorizes them.
void fake_quant_run(const float* __restrict x, float* __restrict out, int64_t n, const Grid& g,
                    bool stochastic, int64_t base, int64_t seed) {
  const float s = g.scale, lo = g.lo, hi = g.hi;
  if (stochastic) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = clamp_nan(std::floor(hash_uniform(base + i, seed) + x[i] / s), lo, hi) * s;
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = clamp_nan(std::nearbyint(x[i] / s), lo, hi) * s;
  }
}

// codes[i] = clamp(round(x/s) + z, 0, 2^B - 1) and x_hat[i] = (codes[i] - z) * s.
void codes_run(const float* __restrict x, uint8_t* __restrict codes, float* __restrict x_hat,
               int64_t n, const Grid& g) {
  const float s = g.scale, z = g.zero_point, lo = g.lo, hi = g.hi;
  for (int64_t i = 0; i < n; ++i) {
    const float y = clamp_nan(std::nearbyint(x[i] / s), lo, hi);
    codes[i] = static_cast<uint8_t>(static_cast<int32_t>(y + z));
    x_hat[i] = y * s;
  }
}

void dequantize_run(const uint8_t* __restrict codes, float* __restrict out, int64_t n, float s,
                    float z) {
  for (int64_t i = 0; i < n; ++i) out[i] = (float(codes[i]) - z) * s;
}

// Sum of v[0, n) in 8 float lanes (a loop the compiler vectorizes without reassociating),
// added up in double.
double lane_sum(const float* __restrict v, int64_t n) {
  if (n < 8) {  // a 1x1 or 2x2 plane: no lanes to set up
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += v[i];
    return s;
  }
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += v[i + j];
  double s = 0;
  for (; i < n; ++i) s += v[i];
  for (int j = 0; j < 8; ++j) s += acc[j];
  return s;
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

float read_float(const Tensor& t) { return *t.const_data_ptr<float>(); }

Tensor scalar(float v) { return at::scalar_tensor(v, at::kFloat); }

// Min and max of n floats (NaN if any is), over blocks in every core.
std::pair<float, float> aminmax(const float* x, int64_t n) {
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

// quantize_grad's pair from one min/max pass and one pass writing both copies, sharing the
// noise. A copy not needed is None; with bits == wbits one copy serves both paths.
std::tuple<std::optional<Tensor>, std::optional<Tensor>> grad_pair(
    const Tensor& g, int64_t bits, int64_t wbits, int64_t seed, bool stochastic,
    bool need_data, bool need_weight) {
  check(g, at::kFloat, "g");
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
  std::optional<Tensor> data, weight;
  if (need_data) data = d;
  if (need_weight) weight = shared ? d : w;
  return {data, weight};
}

// ---- activations ---------------------------------------------------------------------------

// quantize_codes: nearest rounding over [lo, hi] -> (codes, x_hat, scale, zero point).
std::tuple<Tensor, Tensor, Tensor, Tensor> quantize_codes(const Tensor& x, const Tensor& lo,
                                                          const Tensor& hi, int64_t bits) {
  check(x, at::kFloat, "x");
  TORCH_CHECK(bits <= 8, "q8 CPU kernel: codes of more than 8 bits");
  const Grid gr = make_grid(read_float(lo), read_float(hi), bits);
  Tensor codes = at::empty(x.sizes(), x.options().dtype(at::kByte));
  Tensor x_hat = at::empty_like(x);
  const float* px = x.const_data_ptr<float>();
  uint8_t* pc = codes.mutable_data_ptr<uint8_t>();
  float* ph = x_hat.mutable_data_ptr<float>();
  at::parallel_for(0, x.numel(), kGrain, [&](int64_t b, int64_t e) {
    codes_run(px + b, pc + b, ph + b, e - b, gr);
  });
  return {codes, x_hat, scalar(gr.scale), scalar(gr.zero_point)};
}

// (code - z) * s
Tensor dequantize(const Tensor& codes, const Tensor& scale, const Tensor& zero_point) {
  check(codes, at::kByte, "codes");
  const float s = read_float(scale), z = read_float(zero_point);
  Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* pc = codes.const_data_ptr<uint8_t>();
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, codes.numel(), kGrain, [&](int64_t b, int64_t e) {
    dequantize_run(pc + b, po + b, e - b, s, z);
  });
  return out;
}

// ---- weights ----------------------------------------------------------------------------------

// round(w / s) * s with one s per row of w (output channel) or one s: fake_quant_own_range.
Tensor requantize_weight(const Tensor& w, const Tensor& scale) {
  check(w, at::kFloat, "w");
  check(scale, at::kFloat, "scale");
  const int64_t rows = scale.numel(), cols = w.numel() / rows;
  TORCH_CHECK(rows == 1 || rows == w.size(0), "q8 CPU kernel: one scale per row of w");
  Tensor out = at::empty_like(w);
  const float* pw = w.const_data_ptr<float>();
  const float* ps = scale.const_data_ptr<float>();
  float* po = out.mutable_data_ptr<float>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const Grid g{ps[r], 0, -std::numeric_limits<float>::infinity(),
                   std::numeric_limits<float>::infinity()};  // its own range: nothing clips
      fake_quant_run(pw + r * cols, po + r * cols, cols, g, false, 0, 0);
    }
  });
  return out;
}

// quantize_weight: the scale from W's own range (per output channel or whole), then W_hat.
std::tuple<Tensor, Tensor> quantize_weight(const Tensor& w, int64_t bits, bool per_channel) {
  check(w, at::kFloat, "w");
  const int64_t rows = per_channel ? w.size(0) : 1, cols = w.numel() / rows;
  std::vector<int64_t> shape(w.dim(), 1);
  if (per_channel) shape[0] = rows;
  Tensor scale = per_channel ? at::empty(shape, w.options()) : at::empty({}, w.options());
  const float* pw = w.const_data_ptr<float>();
  float* ps = scale.mutable_data_ptr<float>();
  if (per_channel) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / cols), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        auto [lo, hi] = lane_minmax(pw + r * cols, cols);
        ps[r] = make_grid(lo, hi, bits).scale;
      }
    });
  } else {
    auto [lo, hi] = aminmax(pw, w.numel());
    ps[0] = make_grid(lo, hi, bits).scale;
  }
  return {requantize_weight(w, scale), scale};
}

// ---- ReLU: the output and a mask of 1 bit per element (bit i of byte k: element 8k + i) ------

// y = relu(x) into `out` (x itself for an in-place ReLU); returns the mask of y != 0, as the
// PyTorch path (NaN: set).
Tensor relu_pack(const Tensor& x, const Tensor& out) {
  check(x, at::kFloat, "x");
  check(out, at::kFloat, "out");
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
          _mm256_cmp_ps(_mm256_loadu_ps(py + 8 * k), _mm256_setzero_ps(), _CMP_NEQ_UQ)));
#endif
    for (; k < e; ++k) {
      uint8_t m = 0;
      for (int64_t i = 8 * k; i < std::min(8 * k + 8, n); ++i) m |= uint8_t(py[i] != 0) << (i - 8 * k);
      pp[k] = m;
    }
  });
  return packed;
}

// gx = gy * flag (1.0 or 0.0, as the PyTorch path: NaN * 0 stays NaN).
Tensor relu_mask_grad(const Tensor& gy, const Tensor& packed) {
  check(gy, at::kFloat, "gy");
  check(packed, at::kByte, "packed");
  const int64_t n = gy.numel();
  Tensor gx = at::empty_like(gy);
  const float* pg = gy.const_data_ptr<float>();
  const uint8_t* pp = packed.const_data_ptr<uint8_t>();
  float* po = gx.mutable_data_ptr<float>();
  at::parallel_for(0, (n + 7) / 8, kGrain / 8, [&](int64_t b, int64_t e) {
    int64_t k = b;
#ifdef __AVX2__
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; k < e && 8 * k + 8 <= n; ++k) {
      const __m256i m = _mm256_and_si256(_mm256_set1_epi32(pp[k]), bit);
      const __m256 flag = _mm256_and_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(m, bit)), one);
      _mm256_storeu_ps(po + 8 * k, _mm256_mul_ps(flag, _mm256_loadu_ps(pg + 8 * k)));
    }
#endif
    for (int64_t i = 8 * k; i < std::min(8 * e, n); ++i)
      po[i] = float((pp[i >> 3] >> (i & 7)) & 1) * pg[i];
  });
  return gx;
}

// ---- Range BN ---------------------------------------------------------------------------------

// Forward: codes of x over [lo, hi] and, per plane of x_hat, its sum, min and max.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> range_bn_stats(
    const Tensor& x, const Tensor& lo, const Tensor& hi, int64_t bits) {
  check(x, at::kFloat, "x");
  TORCH_CHECK(bits <= 8, "q8 CPU kernel: codes of more than 8 bits");
  const int64_t B = x.size(0), C = x.size(1);
  const Grid gr = make_grid(read_float(lo), read_float(hi), bits);
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
      const float* v = x_hat + (p - p0) * n;
      if (n < 8) {  // 1x1 or 2x2 planes: one loop, no lanes (x_hat is finite or all NaN)
        double sum_p = v[0];
        float lo_p = v[0], hi_p = v[0];
        for (int64_t i = 1; i < n; ++i)
          sum_p += v[i], lo_p = std::min(lo_p, v[i]), hi_p = std::max(hi_p, v[i]);
        ps[p] = float(sum_p), pl[p] = lo_p, ph[p] = hi_p;
        continue;
      }
      ps[p] = float(lane_sum(v, n));
      std::tie(pl[p], ph[p]) = lane_minmax(v, n);
    }
  });
  return {codes, scalar(gr.scale), scalar(gr.zero_point), sum, mn, mx};
}

// y = a * x_hat + b per channel, x_hat from its codes.
Tensor range_bn_affine(const Tensor& codes, const Tensor& scale, const Tensor& zero_point,
                       const Tensor& a, const Tensor& b) {
  check(codes, at::kByte, "codes");
  check(a, at::kFloat, "a");
  check(b, at::kFloat, "b");
  const int64_t C = codes.size(1);
  const float s = read_float(scale), z = read_float(zero_point);
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

// Backward, pass 1: g = gy quantized to `bits` (as quantize_grad), and per plane the sums of g
// and of g * (x_hat - mean), and the number of values at the chunk's max and min. Also returns
// g's range, from which range_bn_grad_input rebuilds the same g.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> range_bn_grad_sums(
    const Tensor& codes, const Tensor& scale, const Tensor& zero_point, const Tensor& gy,
    const Tensor& mean, const Tensor& t_max, const Tensor& t_min, int64_t bits, int64_t seed,
    bool stochastic) {
  check(codes, at::kByte, "codes");
  check(gy, at::kFloat, "gy");
  for (const Tensor* t : {&mean, &t_max, &t_min}) check(*t, at::kFloat, "a statistic");
  const int64_t B = gy.size(0), C = gy.size(1);
  const float s = read_float(scale), z = read_float(zero_point);
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
  for_planes(gy, [&](int64_t p0, int64_t p1, int64_t n, float* buf) {
    const int64_t at = p0 * n, len = (p1 - p0) * n;
    float *g = buf, *x = buf + len;
    fake_quant_run(pg + at, g, len, gr, stochastic, at, seed);
    dequantize_run(pc + at, x, len, s, z);
    for (int64_t p = p0, c = p0 % C; p < p1; ++p, c = c + 1 == C ? 0 : c + 1) {
      float *gp = g + (p - p0) * n, *xp = x + (p - p0) * n;
      const float m = pm[c], hi_t = ptx[p], lo_t = ptn[p];
      int32_t cx = 0, cn = 0;
      for (int64_t i = 0; i < n; ++i) cx += xp[i] == hi_t, cn += xp[i] == lo_t;
      pnx[p] = float(cx), pnn[p] = float(cn);
      if (n < 8) {  // 1x1 or 2x2 planes: one loop, no lanes
        double sg_p = 0, sgx_p = 0;
        for (int64_t i = 0; i < n; ++i) sg_p += gp[i], sgx_p += gp[i] * (xp[i] - m);
        psg[p] = float(sg_p), psgx[p] = float(sgx_p);
        continue;
      }
      psg[p] = float(lane_sum(gp, n));
      for (int64_t i = 0; i < n; ++i) xp[i] = gp[i] * (xp[i] - m);
      psgx[p] = float(lane_sum(xp, n));
    }
  });
  return {sg, sgx, nmax, nmin, scalar(glo), scalar(ghi)};
}

// Backward, pass 2: dL/dx = a * (g - g_mean) + w_max where x is its chunk's max - w_min where
// x is its chunk's min; g rebuilt from gy, its range and the seed.
Tensor range_bn_grad_input(const Tensor& codes, const Tensor& scale, const Tensor& zero_point,
                           const Tensor& gy, const Tensor& g_lo, const Tensor& g_hi, int64_t bits,
                           int64_t seed, bool stochastic, const Tensor& a, const Tensor& g_mean,
                           const Tensor& t_max, const Tensor& t_min, const Tensor& w_max,
                           const Tensor& w_min) {
  check(codes, at::kByte, "codes");
  check(gy, at::kFloat, "gy");
  for (const Tensor* t : {&a, &g_mean, &t_max, &t_min, &w_max, &w_min})
    check(*t, at::kFloat, "a statistic");
  const int64_t C = gy.size(1);
  const float s = read_float(scale), z = read_float(zero_point);
  const Grid gr = make_grid(read_float(g_lo), read_float(g_hi), bits);
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

}  // namespace

TORCH_LIBRARY(q8_cpu, m) {
  m.def("grad_pair(Tensor g, int bits, int wbits, int seed, bool stochastic, bool need_data, "
        "bool need_weight) -> (Tensor?, Tensor?)", grad_pair);
  m.def("quantize_codes(Tensor x, Tensor lo, Tensor hi, int bits) -> (Tensor, Tensor, Tensor, "
        "Tensor)", quantize_codes);
  m.def("dequantize(Tensor codes, Tensor scale, Tensor zero_point) -> Tensor", dequantize);
  m.def("quantize_weight(Tensor w, int bits, bool per_channel) -> (Tensor, Tensor)",
        quantize_weight);
  m.def("requantize_weight(Tensor w, Tensor scale) -> Tensor", requantize_weight);
  m.def("relu_pack(Tensor x, Tensor(a!) out) -> Tensor", relu_pack);
  m.def("relu_mask_grad(Tensor gy, Tensor packed) -> Tensor", relu_mask_grad);
  m.def("range_bn_stats(Tensor x, Tensor lo, Tensor hi, int bits) -> (Tensor, Tensor, Tensor, "
        "Tensor, Tensor, Tensor)", range_bn_stats);
  m.def("range_bn_affine(Tensor codes, Tensor scale, Tensor zero_point, Tensor a, Tensor b) -> "
        "Tensor", range_bn_affine);
  m.def("range_bn_grad_sums(Tensor codes, Tensor scale, Tensor zero_point, Tensor gy, "
        "Tensor mean, Tensor t_max, Tensor t_min, int bits, int seed, bool stochastic) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", range_bn_grad_sums);
  m.def("range_bn_grad_input(Tensor codes, Tensor scale, Tensor zero_point, Tensor gy, "
        "Tensor g_lo, Tensor g_hi, int bits, int seed, bool stochastic, Tensor a, Tensor g_mean, "
        "Tensor t_max, Tensor t_min, Tensor w_max, Tensor w_min) -> Tensor",
        range_bn_grad_input);
}
