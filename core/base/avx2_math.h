// AVX2 + FMA helpers shared by the CPU kernels (decode attention, fused model ops, the fused
// cross-entropy, the bf16 row product, the sampler): the run-time checks, bf16 loads, lane sums
// and maxima, a row maximum and its first index (argmax), and a vectorized exp (8 and 16 wide).
// Functions carry target("avx2,fma"), so callers need no -mavx2; call them only where
// has_avx2_fma().
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace andy {

inline bool has_avx2_fma() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// AVX-512 F, BW and VL (Skylake-SP and later Xeons, Zen 4): the decode attention's 16-wide path.
inline bool has_avx512_bw_vl() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && has_avx2_fma();
  return yes;
}

// F16C (fp16 <-> fp32 conversion): every AVX2 CPU has it, but it is its own CPUID bit.
inline bool has_f16c() {
  static const bool yes = __builtin_cpu_supports("f16c");
  return yes;
}

// ANDYLLM_FUSED_OPS=0 turns every fused path off (CPU kernels and the GPU's LibTorch 2.x fused
// ops), to measure or compare against the unfused LibTorch composites in the same build.
inline bool fused_ops_requested() {
  static const bool on = [] {
    const char* v = std::getenv("ANDYLLM_FUSED_OPS");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

// The fused CPU kernels run unless ANDYLLM_FUSED_OPS=0 or the CPU lacks AVX2 + FMA.
inline bool fused_kernels_enabled() {
  static const bool on = fused_ops_requested() && has_avx2_fma();
  return on;
}

// A bf16 value (its 16 bits) as fp32: exact, the bits shifted into the high half.
inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 8 bf16 values as 8 floats (exact).
__attribute__((target("avx2,fma"))) inline __m256 load_bf16x8(const uint16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// The sum of v's 8 lanes.
__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The sum of v's 8 lanes added in pairs, ((0 + 1) + (2 + 3)) + ((4 + 5) + (6 + 7)): the order
// the softmax and cross-entropy kernels sum their exponentials in (hsum8 adds in another).
__attribute__((target("avx2,fma"))) inline float hsum8_pairs(__m256 v) {
  alignas(32) float l[8];
  _mm256_store_ps(l, v);
  return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]));
}

// The largest of v's 8 lanes (compared as std::max_element does).
__attribute__((target("avx2,fma"))) inline float hmax8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  return *std::max_element(lanes, lanes + 8);
}

// The largest of x[0..n) (-inf for n == 0). Four accumulators: _mm256_max_ps has a latency of
// four cycles and a throughput of two a cycle, so one accumulator runs at an eighth of the speed.
__attribute__((target("avx2,fma"))) inline float max_avx2(const float* x, int64_t n) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    m2 = _mm256_max_ps(m2, _mm256_loadu_ps(x + i + 16));
    m3 = _mm256_max_ps(m3, _mm256_loadu_ps(x + i + 24));
  }
  for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
  float r = hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  for (; i < n; ++i) r = std::max(r, x[i]);
  return r;
}

// Index of the largest of x[0..n) (the lowest among ties; 0 when all are -inf), and whether any
// is NaN: one vectorized pass for the maximum (four accumulators, as max_avx2), then a vectorized
// search for its first occurrence (n when there is none: a NaN maximum).
__attribute__((target("avx2,fma"))) inline int64_t argmax_f32_avx2(const float* x, int64_t n, bool& nan) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf, u0 = _mm256_setzero_ps(), u1 = u0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    const __m256 c = _mm256_loadu_ps(x + i + 16), d = _mm256_loadu_ps(x + i + 24);
    m0 = _mm256_max_ps(m0, a);
    m1 = _mm256_max_ps(m1, b);
    m2 = _mm256_max_ps(m2, c);
    m3 = _mm256_max_ps(m3, d);
    u0 = _mm256_or_ps(u0, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
    u1 = _mm256_or_ps(u1, _mm256_or_ps(_mm256_cmp_ps(c, c, _CMP_UNORD_Q), _mm256_cmp_ps(d, d, _CMP_UNORD_Q)));
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    m0 = _mm256_max_ps(m0, v);
    u0 = _mm256_or_ps(u0, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  float mx = hmax8(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
  nan = _mm256_movemask_ps(_mm256_or_ps(u0, u1)) != 0;
  for (; i < n; ++i) {
    nan |= std::isnan(x[i]);
    mx = std::max(mx, x[i]);
  }
  const __m256 target = _mm256_set1_ps(mx);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), target, _CMP_EQ_OQ));
    if (hit != 0) return j + __builtin_ctz(static_cast<unsigned>(hit));
  }
  return std::find(x + j, x + n, mx) - x;
}

// Either way (the portable loop where the CPU lacks AVX2).
inline int64_t argmax_f32(const float* x, int64_t n, bool& nan) {
  if (has_avx2_fma()) return argmax_f32_avx2(x, n, nan);
  int64_t best = 0;
  nan = false;
  for (int64_t i = 0; i < n; ++i) {
    nan |= std::isnan(x[i]);
    if (x[i] > x[best]) best = i;
  }
  return best;
}

// exp(x) for 8 floats (Cephes' method: 2^n * e^r with |r| <= ln2/2 and a degree-5 polynomial;
// relative error about 2e-7 over the range softmax uses, x <= 0).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-88.3762626647949f);
  x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // r = x - n ln2, with ln2 split in two for precision
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

// The mask of the first min(n, 16) lanes of a 16-lane operation (n > 0): a row's tail.
inline __mmask16 first_lanes16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// exp8's method on 16 floats (the same operations lane by lane, so the same values); call only
// where has_avx512_bw_vl().
__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma"))) inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-88.3762626647949f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(n));
}

// Rows per at::parallel_for chunk for the row kernels of width d: about 32k elements per task.
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, d)); }

// Calls f(float{}) or f(c10::BFloat16{}) for x's dtype (the kernels' two element types; the
// callers check that x is one of them).
template <typename F>
void on_float_or_bf16(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat)
    f(float{});
  else
    f(c10::BFloat16{});
}

}  // namespace andy
