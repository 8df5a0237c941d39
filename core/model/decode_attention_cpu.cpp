// CPU decode attention (see decode_attention_cpu.h). The AVX2 functions carry
// target("avx2,fma,f16c") and run only where has_avx2_fma() and has_f16c(); the AVX-512 ones
// (ANDY_AVX512) only where has_avx512_bw_vl() too (core/base/avx2_math.h). Functions of one
// target are not inlined into code of another (lambdas included), so each path is written out.
#include "core/model/decode_attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/base/avx2_math.h"
#include "core/base/error.h"

// GCC 12's AVX-512 intrinsics build their "undefined" vectors by self-initialization, which
// -Wmaybe-uninitialized reports at every inlined use (a false positive; GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace andy {

namespace {

#define ANDY_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// Cache elements: fp32, bf16 or fp16 (serve.kv_cache_dtype), read as fp32. load16 reads the
// first `n` of 16 elements (the rest 0) under mask m = (1 << n) - 1, nothing beyond them.
struct F32 {
  using T = float;
  static float scalar(const T* p) { return *p; }
  __attribute__((target("avx2,fma,f16c"))) static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
  ANDY_AVX512 static __m512 load16(const T* p) { return _mm512_loadu_ps(p); }
  ANDY_AVX512 static __m512 load16(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct BF16 {
  using T = uint16_t;
  static float scalar(const T* p) { return bf16_bits_to_float(*p); }
  __attribute__((target("avx2,fma,f16c"))) static __m256 load8(const T* p) { return load_bf16x8(p); }
  ANDY_AVX512 static __m512 widen(__m256i w) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(w), 16));
  }
  ANDY_AVX512 static __m512 load16(const T* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  ANDY_AVX512 static __m512 load16(const T* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
};
struct F16 {
  using T = uint16_t;
  static float scalar(const T* p) { return static_cast<float>(c10::Half(*p, c10::Half::from_bits())); }
  __attribute__((target("avx2,fma,f16c"))) static __m256 load8(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  ANDY_AVX512 static __m512 load16(const T* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  ANDY_AVX512 static __m512 load16(const T* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};

template <class E>
void axpy_portable(float w, const typename E::T* x, float* y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += w * E::scalar(x + i);
}

template <class E>
__attribute__((target("avx2,fma,f16c"))) void axpy_avx2(float w, const typename E::T* x, float* y, int64_t d) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, E::load8(x + i), _mm256_loadu_ps(y + i)));
  for (; i < d; ++i) y[i] += w * E::scalar(x + i);
}

// scores[i] = exp(scale * scores[i] - max) for i < n; returns their sum.
__attribute__((target("avx2,fma"))) float exp_scores_avx2(float* scores, int64_t n, float scale, float mx) {
  const __m256 sv = _mm256_set1_ps(scale), mv = _mm256_set1_ps(mx);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(scores + i), sv, mv));
    _mm256_storeu_ps(scores + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8_pairs(acc);
  for (; i < n; ++i) {
    scores[i] = std::exp(scores[i] * scale - mx);
    sum += scores[i];
  }
  return sum;
}

// exp_scores_avx2 16 at a time (the tail under a mask), after the maximum of the scores: both
// passes at twice AVX2's width. Returns the sum of the exponentials.
ANDY_AVX512 float exp_scores_avx512(float* scores, int64_t n, float scale) {
  __m512 m0 = _mm512_set1_ps(-std::numeric_limits<float>::infinity()), m1 = m0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    m0 = _mm512_max_ps(m0, _mm512_loadu_ps(scores + i));
    m1 = _mm512_max_ps(m1, _mm512_loadu_ps(scores + i + 16));
  }
  for (; i < n; i += 16) {
    const __mmask16 m = first_lanes16(n - i);
    m0 = _mm512_mask_max_ps(m0, m, m0, _mm512_maskz_loadu_ps(m, scores + i));
  }
  // Lanes through memory, and a masked max: GCC 12 warns of _mm512_reduce_*'s and (here)
  // _mm512_max_ps's undefined pass-through operand.
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, _mm512_mask_max_ps(m0, __mmask16(0xFFFF), m0, m1));
  const __m512 sv = _mm512_set1_ps(scale), mv = _mm512_set1_ps(scale * *std::max_element(lanes, lanes + 16));
  __m512 acc = _mm512_setzero_ps();
  for (i = 0; i < n; i += 16) {
    const __mmask16 m = first_lanes16(n - i);
    const __m512 e = exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, scores + i), sv, mv));
    _mm512_mask_storeu_ps(scores + i, m, e);
    acc = _mm512_mask_add_ps(acc, m, acc, e);
  }
  _mm512_store_ps(lanes, acc);
  float sum = 0;
  for (float l : lanes) sum += l;
  return sum;
}

// Scores against transposed keys: kt[x * bs + r] is dimension x of key r (a block's keys of
// one head, kv_cache.h), so the scores of `cols` keys come out of d vector products, with no
// sums across lanes. Heads in pairs, each with two accumulators (even and odd dimensions).
// dst[h * dst_stride + r] for the g heads of the group (queries q + h * d), r < cols.

// 16 keys at a time (AVX-512); Full: all 16, else the first `cols` under mask m (masked loads
// read nothing beyond them). Whole vectors are stored plainly: a masked store does not forward
// to the softmax's loads that follow.
template <bool Full, class E>
ANDY_AVX512 inline __m512 load_keys(const typename E::T* p, __mmask16 m) {
  if constexpr (Full)
    return E::load16(p);
  else
    return E::load16(p, m);
}
template <bool Full>
ANDY_AVX512 inline void store_scores(float* p, __mmask16 m, __m512 x) {
  if constexpr (Full)
    _mm512_storeu_ps(p, x);
  else
    _mm512_mask_storeu_ps(p, m, x);
}
template <bool Full, class E>
ANDY_AVX512 void scores16_avx512(const float* q, int64_t g, int64_t d, const typename E::T* kt, int64_t bs,
                                 __mmask16 m, float* dst, int64_t dst_stride) {
  int64_t h = 0;
  for (; h + 2 <= g; h += 2) {
    const float* q0 = q + h * d;
    const float* q1 = q0 + d;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t x = 0;
    for (; x + 2 <= d; x += 2) {
      const __m512 k0 = load_keys<Full, E>(kt + x * bs, m), k1 = load_keys<Full, E>(kt + (x + 1) * bs, m);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[x]), k0, a0);
      b0 = _mm512_fmadd_ps(_mm512_set1_ps(q1[x]), k0, b0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(q0[x + 1]), k1, a1);
      b1 = _mm512_fmadd_ps(_mm512_set1_ps(q1[x + 1]), k1, b1);
    }
    if (x < d) {
      const __m512 k0 = load_keys<Full, E>(kt + x * bs, m);
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[x]), k0, a0);
      b0 = _mm512_fmadd_ps(_mm512_set1_ps(q1[x]), k0, b0);
    }
    store_scores<Full>(dst + h * dst_stride, m, _mm512_add_ps(a0, a1));
    store_scores<Full>(dst + (h + 1) * dst_stride, m, _mm512_add_ps(b0, b1));
  }
  if (h < g) {
    const float* q0 = q + h * d;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t x = 0;
    for (; x + 2 <= d; x += 2) {
      a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[x]), load_keys<Full, E>(kt + x * bs, m), a0);
      a1 = _mm512_fmadd_ps(_mm512_set1_ps(q0[x + 1]), load_keys<Full, E>(kt + (x + 1) * bs, m), a1);
    }
    if (x < d) a0 = _mm512_fmadd_ps(_mm512_set1_ps(q0[x]), load_keys<Full, E>(kt + x * bs, m), a0);
    store_scores<Full>(dst + h * dst_stride, m, _mm512_add_ps(a0, a1));
  }
}

// 8 keys (AVX2).
template <class E>
__attribute__((target("avx2,fma,f16c"))) void scores8_avx2(const float* q, int64_t g, int64_t d,
                                                            const typename E::T* kt, int64_t bs, float* dst,
                                                            int64_t dst_stride) {
  int64_t h = 0;
  for (; h + 2 <= g; h += 2) {
    const float* q0 = q + h * d;
    const float* q1 = q0 + d;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
    int64_t x = 0;
    for (; x + 2 <= d; x += 2) {
      const __m256 k0 = E::load8(kt + x * bs), k1 = E::load8(kt + (x + 1) * bs);
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(q0[x]), k0, a0);
      b0 = _mm256_fmadd_ps(_mm256_set1_ps(q1[x]), k0, b0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(q0[x + 1]), k1, a1);
      b1 = _mm256_fmadd_ps(_mm256_set1_ps(q1[x + 1]), k1, b1);
    }
    if (x < d) {
      const __m256 k0 = E::load8(kt + x * bs);
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(q0[x]), k0, a0);
      b0 = _mm256_fmadd_ps(_mm256_set1_ps(q1[x]), k0, b0);
    }
    _mm256_storeu_ps(dst + h * dst_stride, _mm256_add_ps(a0, a1));
    _mm256_storeu_ps(dst + (h + 1) * dst_stride, _mm256_add_ps(b0, b1));
  }
  if (h < g) {
    const float* q0 = q + h * d;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    int64_t x = 0;
    for (; x + 2 <= d; x += 2) {
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(q0[x]), E::load8(kt + x * bs), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(q0[x + 1]), E::load8(kt + (x + 1) * bs), a1);
    }
    if (x < d) a0 = _mm256_fmadd_ps(_mm256_set1_ps(q0[x]), E::load8(kt + x * bs), a0);
    _mm256_storeu_ps(dst + h * dst_stride, _mm256_add_ps(a0, a1));
  }
}

// One key at a time (portable; the AVX2 path's last keys of a block).
template <class E>
void scores1(const float* q, int64_t g, int64_t d, const typename E::T* kt, int64_t bs, float* dst,
             int64_t dst_stride) {
  for (int64_t h = 0; h < g; ++h) {
    float a0 = 0, a1 = 0;
    int64_t x = 0;
    for (; x + 2 <= d; x += 2) {
      a0 += q[h * d + x] * E::scalar(kt + x * bs);
      a1 += q[h * d + x + 1] * E::scalar(kt + (x + 1) * bs);
    }
    if (x < d) a0 += q[h * d + x] * E::scalar(kt + x * bs);
    dst[h * dst_stride] = a0 + a1;
  }
}

// out[h * d + (0..d)] += sum_p w[h * stride + p] * v[p * d + (0..d)] for the G heads of a
// group, over `n` rows, accumulated in registers (d = 8 * NV): each value row is loaded once for
// all G heads.
template <int NV, int G, class E>
__attribute__((target("avx2,fma,f16c"))) void weighted_sum_avx2(const float* w, int64_t stride,
                                                                const typename E::T* v, int64_t n,
                                                                float* out) {
  constexpr int64_t d = 8 * NV;
  __m256 acc[G * NV];
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) acc[h * NV + i] = _mm256_loadu_ps(out + h * NV * 8 + 8 * i);
  int64_t p = 0;
  if (G * NV <= 4) {  // two rows at a time into two sets of accumulators (the FMA latency)
    __m256 acc2[G * NV];
    for (int i = 0; i < G * NV; ++i) acc2[i] = _mm256_setzero_ps();
    for (; p + 2 <= n; p += 2) {
      __m256 r0[NV], r1[NV];
      for (int i = 0; i < NV; ++i) r0[i] = E::load8(v + p * d + 8 * i);
      for (int i = 0; i < NV; ++i) r1[i] = E::load8(v + (p + 1) * d + 8 * i);
      for (int h = 0; h < G; ++h) {
        const __m256 w0 = _mm256_set1_ps(w[h * stride + p]), w1 = _mm256_set1_ps(w[h * stride + p + 1]);
        for (int i = 0; i < NV; ++i) acc[h * NV + i] = _mm256_fmadd_ps(w0, r0[i], acc[h * NV + i]);
        for (int i = 0; i < NV; ++i) acc2[h * NV + i] = _mm256_fmadd_ps(w1, r1[i], acc2[h * NV + i]);
      }
    }
    for (int i = 0; i < G * NV; ++i) acc[i] = _mm256_add_ps(acc[i], acc2[i]);
  }
  for (; p < n; ++p) {
    __m256 row[NV];
    for (int i = 0; i < NV; ++i) row[i] = E::load8(v + p * d + 8 * i);
    for (int h = 0; h < G; ++h) {
      const __m256 wv = _mm256_set1_ps(w[h * stride + p]);
      for (int i = 0; i < NV; ++i) acc[h * NV + i] = _mm256_fmadd_ps(wv, row[i], acc[h * NV + i]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + h * NV * 8 + 8 * i, acc[h * NV + i]);
}

// The same with AVX-512 for d = 16 * M: U rows at a time into U sets of accumulators.
template <int M, int G, class E>
ANDY_AVX512 void weighted_sum_avx512(const float* w, int64_t stride, const typename E::T* v, int64_t n, float* out) {
  constexpr int64_t d = 16 * M;
  constexpr int U = G * M >= 8 ? 1 : 8 / (G * M);
  __m512 acc[U][G * M];
  for (int u = 0; u < U; ++u)
    for (int i = 0; i < G * M; ++i) acc[u][i] = u == 0 ? _mm512_loadu_ps(out + 16 * i) : _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + U <= n; p += U)
    for (int u = 0; u < U; ++u) {
      __m512 row[M];
      for (int m = 0; m < M; ++m) row[m] = E::load16(v + (p + u) * d + 16 * m);
      for (int h = 0; h < G; ++h) {
        const __m512 wv = _mm512_set1_ps(w[h * stride + p + u]);
        for (int m = 0; m < M; ++m) acc[u][h * M + m] = _mm512_fmadd_ps(wv, row[m], acc[u][h * M + m]);
      }
    }
  for (; p < n; ++p) {
    __m512 row[M];
    for (int m = 0; m < M; ++m) row[m] = E::load16(v + p * d + 16 * m);
    for (int h = 0; h < G; ++h) {
      const __m512 wv = _mm512_set1_ps(w[h * stride + p]);
      for (int m = 0; m < M; ++m) acc[0][h * M + m] = _mm512_fmadd_ps(wv, row[m], acc[0][h * M + m]);
    }
  }
  for (int u = 1; u < U; ++u)
    for (int i = 0; i < G * M; ++i) acc[0][i] = _mm512_add_ps(acc[0][i], acc[u][i]);
  for (int i = 0; i < G * M; ++i) _mm512_storeu_ps(out + 16 * i, acc[0][i]);
}

// The g heads' weighted sums with AVX-512 (d = 16 * M), two heads at a time where registers allow.
template <int M, class E>
void weighted_sums_avx512(const float* w, int64_t stride, int64_t g, const typename E::T* v, int64_t n,
                          float* out) {
  int64_t h = 0;
  if (M <= 4)
    for (; h + 2 <= g; h += 2) weighted_sum_avx512<M, 2, E>(w + h * stride, stride, v, n, out + h * 16 * M);
  for (; h < g; ++h) weighted_sum_avx512<M, 1, E>(w + h * stride, stride, v, n, out + h * 16 * M);
}

// The weighted sums of `g` heads (weights rows of `stride`) over `n` contiguous value rows of d,
// added to out, fused where registers allow.
template <class E>
void weighted_sums(bool avx2, const float* w, int64_t stride, int64_t g, const typename E::T* v,
                   int64_t n, int64_t d, float* out) {
  if (avx2) {
    const int64_t nv = d / 8;
    if (d % 8 == 0) {
      if (nv == 2 && g == 1) return weighted_sum_avx2<2, 1, E>(w, stride, v, n, out);
      if (nv == 2 && g == 2) return weighted_sum_avx2<2, 2, E>(w, stride, v, n, out);
      if (nv == 2 && g == 4) return weighted_sum_avx2<2, 4, E>(w, stride, v, n, out);
      if (nv == 4 && g == 1) return weighted_sum_avx2<4, 1, E>(w, stride, v, n, out);
      if (nv == 4 && g == 2) return weighted_sum_avx2<4, 2, E>(w, stride, v, n, out);
      if (nv == 8 && g == 1) return weighted_sum_avx2<8, 1, E>(w, stride, v, n, out);
      if (nv == 16 && g == 1) return weighted_sum_avx2<16, 1, E>(w, stride, v, n, out);
      if (g > 1) {  // one head at a time
        for (int64_t h = 0; h < g; ++h)
          weighted_sums<E>(avx2, w + h * stride, stride, 1, v, n, d, out + h * d);
        return;
      }
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    float* o = out + h * d;
    for (int64_t p = 0; p < n; ++p) {
      if (avx2)
        axpy_avx2<E>(w[h * stride + p], v + p * d, o, d);
      else
        axpy_portable<E>(w[h * stride + p], v + p * d, o, d);
    }
  }
}

// How many blocks ahead of the one computed attend() prefetches. Two, not one: one core's reads
// from beyond L2 (a step's KV cache is larger) need more requests in flight than one 1 KB run
// gives (bench attention, tiny's shape at concurrency 32: 286 -> 271 us per step).
constexpr int64_t kAhead = 2;

// Prefetches `bytes` bytes from p into L1.
inline void prefetch_bytes(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(p) + b, _MM_HINT_T0);
}

CpuIsa best_isa() {
  if (has_avx512_bw_vl() && has_f16c()) return CpuIsa::kAvx512;
  if (has_avx2_fma() && has_f16c()) return CpuIsa::kAvx2;
  return CpuIsa::kPortable;
}
std::atomic<int> g_isa_limit{static_cast<int>(CpuIsa::kAvx512)};

// One (sequence, kv head): the group's query heads against the sequence's context, block by
// block of the paged cache. A block holds this head's keys (transposed) and values each as one
// contiguous run (kv_cache.h), somewhere in the pool where the hardware prefetcher starts over,
// so the next blocks' runs are prefetched while this one is computed. Pass 1: the scores of every
// head of the group, 16 (AVX-512) or 8 (AVX2) keys at a time; then a softmax per head, whose
// 1/sum is applied to the output at the end; pass 2: the weighted sums of the values,
// accumulated in registers.
template <class E>
void attend(const DecodeAttentionArgs& a, CpuIsa isa, int64_t s, int64_t j, std::vector<float>& scores) {
  using T = typename E::T;
  const int64_t d = a.head_dim, h_kv = a.n_kv_head, g = a.n_head / h_kv, ctx = a.context_len[s];
  const int64_t bs = a.block_size;
  const std::vector<int64_t>& table = *a.tables[s];
  const float* q = a.q + (a.rows[s] * a.n_head + j * g) * d;
  float* out = a.out + (a.rows[s] * a.n_head + j * g) * d;
  const int64_t run = d * bs;  // elements of one head's keys (or values) in a block
  const int64_t run_bytes = run * static_cast<int64_t>(sizeof(T));
  const int64_t n_blocks = (ctx + bs - 1) / bs;
  auto rows_in = [&](int64_t b) { return std::min(bs, ctx - b * bs); };
  auto base = [&](const void* cache, int64_t b) { return static_cast<const T*>(cache) + (table[b] * h_kv + j) * run; };
  const bool avx2 = isa != CpuIsa::kPortable;
  scores.resize(static_cast<size_t>(g * ctx + g));  // the scores, then 1/sum of each head
  float* inv = scores.data() + g * ctx;
  for (int64_t b = 0; b < std::min(kAhead, n_blocks); ++b) prefetch_bytes(base(a.k_cache, b), run_bytes);
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (b + kAhead < n_blocks) prefetch_bytes(base(a.k_cache, b + kAhead), run_bytes);
    const T* kt = base(a.k_cache, b);
    const int64_t n = rows_in(b);
    float* dst = scores.data() + b * bs;
    int64_t r = 0;
    if (isa == CpuIsa::kAvx512) {
      for (; r + 16 <= n; r += 16) scores16_avx512<true, E>(q, g, d, kt + r, bs, 0xFFFF, dst + r, ctx);
      if (r < n) scores16_avx512<false, E>(q, g, d, kt + r, bs, first_lanes16(n - r), dst + r, ctx);
      r = n;
    } else if (avx2) {
      for (; r + 8 <= n; r += 8) scores8_avx2<E>(q, g, d, kt + r, bs, dst + r, ctx);
    }
    for (; r < n; ++r) scores1<E>(q, g, d, kt + r, bs, dst + r, ctx);
  }
  // The values' first blocks load while the softmax runs.
  for (int64_t b = 0; b < std::min(kAhead, n_blocks); ++b) prefetch_bytes(base(a.v_cache, b), run_bytes);
  for (int64_t h = 0; h < g; ++h) {  // scale > 0: the largest scaled score is scale * max
    float* sc = scores.data() + h * ctx;
    float sum = 0;
    if (isa == CpuIsa::kAvx512) {
      sum = exp_scores_avx512(sc, ctx, a.scale);
    } else if (avx2) {
      sum = exp_scores_avx2(sc, ctx, a.scale, a.scale * max_avx2(sc, ctx));
    } else {
      const float mx = a.scale * *std::max_element(sc, sc + ctx);
      for (int64_t i = 0; i < ctx; ++i) {
        sc[i] = std::exp(sc[i] * a.scale - mx);
        sum += sc[i];
      }
    }
    inv[h] = 1.0f / sum;
  }
  std::fill(out, out + g * d, 0.0f);
  const int64_t m16 = isa == CpuIsa::kAvx512 && d % 16 == 0 ? d / 16 : 0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (b + kAhead < n_blocks) prefetch_bytes(base(a.v_cache, b + kAhead), run_bytes);
    const float* w = scores.data() + b * bs;
    const T* v = base(a.v_cache, b);  // [bs, d]
    const int64_t n = rows_in(b);
    switch (m16) {
      case 1: weighted_sums_avx512<1, E>(w, ctx, g, v, n, out); break;
      case 2: weighted_sums_avx512<2, E>(w, ctx, g, v, n, out); break;
      case 4: weighted_sums_avx512<4, E>(w, ctx, g, v, n, out); break;
      case 8: weighted_sums_avx512<8, E>(w, ctx, g, v, n, out); break;
      default: weighted_sums<E>(avx2, w, ctx, g, v, n, d, out);
    }
  }
  for (int64_t h = 0; h < g; ++h)
    for (int64_t x = 0; x < d; ++x) out[h * d + x] *= inv[h];
}

template <class E>
void attend_all(const DecodeAttentionArgs& a, CpuIsa isa) {
  const int64_t n = static_cast<int64_t>(a.rows.size());
  at::parallel_for(0, n * a.n_kv_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) attend<E>(a, isa, i / a.n_kv_head, i % a.n_kv_head, scores);
  });
}

}  // namespace

bool decode_attention_cpu_supports(c10::ScalarType kv_dtype) {
  return kv_dtype == at::kFloat || kv_dtype == at::kBFloat16 || kv_dtype == at::kHalf;
}

CpuIsa decode_attention_cpu_isa() {
  static const CpuIsa best = best_isa();  // the CPU checks are cached themselves
  return static_cast<CpuIsa>(std::min(static_cast<int>(best), g_isa_limit.load()));
}

void decode_attention_cpu_limit_isa(CpuIsa isa) { g_isa_limit.store(static_cast<int>(isa)); }

std::vector<CpuIsa> decode_attention_cpu_isas() {
  std::vector<CpuIsa> out;
  for (int i = static_cast<int>(best_isa()); i >= 0; --i) out.push_back(static_cast<CpuIsa>(i));
  return out;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kPortable: return "portable";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
  }
  return "?";
}

void decode_attention_cpu(const DecodeAttentionArgs& a) {
  const CpuIsa isa = decode_attention_cpu_isa();
  switch (a.kv_dtype) {
    case at::kFloat: return attend_all<F32>(a, isa);
    case at::kBFloat16: return attend_all<BF16>(a, isa);
    case at::kHalf: return attend_all<F16>(a, isa);
    default: ANDY_CHECK(false, "decode_attention_cpu: KV cache dtype ", a.kv_dtype, " (fp32, bf16 or fp16 expected)");
  }
}

}  // namespace andy

#undef ANDY_AVX512
