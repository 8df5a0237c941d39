// CPU decode attention (see decode_attention_cpu.h). The AVX2 functions carry
// target("avx2,fma,f16c") and run only where has_avx2_fma() and has_f16c() (core/base/avx2_math.h).
#include "core/model/decode_attention_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/base/avx2_math.h"
#include "core/base/error.h"

namespace andy {

namespace {

// Cache elements: fp32, bf16 or fp16 (serve.kv_cache_dtype), read as fp32.
struct F32 {
  using T = float;
  static float scalar(const T* p) { return *p; }
  __attribute__((target("avx2,fma,f16c"))) static __m256 load8(const T* p) { return _mm256_loadu_ps(p); }
};
struct BF16 {
  using T = uint16_t;
  static float scalar(const T* p) { return bf16_bits_to_float(*p); }
  __attribute__((target("avx2,fma,f16c"))) static __m256 load8(const T* p) { return load_bf16x8(p); }
};
struct F16 {
  using T = uint16_t;
  static float scalar(const T* p) { return static_cast<float>(c10::Half(*p, c10::Half::from_bits())); }
  __attribute__((target("avx2,fma,f16c"))) static __m256 load8(const T* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

template <class E>
float dot_portable(const float* a, const typename E::T* b, int64_t d) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int l = 0; l < 8; ++l) s[l] += a[i + l] * E::scalar(b + i + l);
  float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < d; ++i) r += a[i] * E::scalar(b + i);
  return r;
}

template <class E>
void axpy_portable(float w, const typename E::T* x, float* y, int64_t d) {
  for (int64_t i = 0; i < d; ++i) y[i] += w * E::scalar(x + i);
}

template <class E>
__attribute__((target("avx2,fma,f16c"))) float dot_avx2(const float* a, const typename E::T* b, int64_t d) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), E::load8(b + i), acc);
  float r = hsum8(acc);
  for (; i < d; ++i) r += a[i] * E::scalar(b + i);
  return r;
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

// Sum of each of 8 vectors, as one vector [sum(a0), .., sum(a7)].
__attribute__((target("avx2,fma"))) inline __m256 sum8(const __m256* a) {
  __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Scores of query `q` against 8 key rows `stride` apart, written to dst[0..8): 8 dot products
// reduced together.
template <class E>
__attribute__((target("avx2,fma,f16c"))) void dot8_avx2(const float* q, const typename E::T* k, int64_t stride,
                                                         int64_t d, float* dst) {
  __m256 acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t x = 0; x < d; x += 8) {
    const __m256 qv = _mm256_loadu_ps(q + x);
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(qv, E::load8(k + i * stride + x), acc[i]);
  }
  _mm256_storeu_ps(dst, sum8(acc));
}
// The scores of the G heads of a group against 8 key rows of head_dim 16 (the rows `stride`
// apart), written to dst[h * dst_stride + (0..8)]: each key row is loaded once for the G heads.
template <int G, class E>
__attribute__((target("avx2,fma,f16c"))) void dot8x16_avx2(const float* q, const typename E::T* k,
                                                            int64_t stride, float* dst, int64_t dst_stride) {
  __m256 qv[G][2];
  for (int h = 0; h < G; ++h) {
    qv[h][0] = _mm256_loadu_ps(q + 16 * h);
    qv[h][1] = _mm256_loadu_ps(q + 16 * h + 8);
  }
  __m256 acc[G][8];
  for (int i = 0; i < 8; ++i) {
    const __m256 k0 = E::load8(k + i * stride), k1 = E::load8(k + i * stride + 8);
    for (int h = 0; h < G; ++h) acc[h][i] = _mm256_fmadd_ps(qv[h][1], k1, _mm256_mul_ps(qv[h][0], k0));
  }
  for (int h = 0; h < G; ++h) _mm256_storeu_ps(dst + h * dst_stride, sum8(acc[h]));
}

// out[h * d + (0..d)] += sum_p w[h * stride + p] * v[p * vstride + (0..d)] for the G heads of a
// group, over `n` rows, accumulated in registers (d = 8 * NV): each value row is loaded once for
// all G heads.
template <int NV, int G, class E>
__attribute__((target("avx2,fma,f16c"))) void weighted_sum_avx2(const float* w, int64_t stride,
                                                                const typename E::T* v, int64_t vstride,
                                                                int64_t n, float* out) {
  __m256 acc[G * NV];
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) acc[h * NV + i] = _mm256_loadu_ps(out + h * NV * 8 + 8 * i);
  for (int64_t p = 0; p < n; ++p) {
    __m256 row[NV];
    for (int i = 0; i < NV; ++i) row[i] = E::load8(v + p * vstride + 8 * i);
    for (int h = 0; h < G; ++h) {
      const __m256 wv = _mm256_set1_ps(w[h * stride + p]);
      for (int i = 0; i < NV; ++i) acc[h * NV + i] = _mm256_fmadd_ps(wv, row[i], acc[h * NV + i]);
    }
  }
  for (int h = 0; h < G; ++h)
    for (int i = 0; i < NV; ++i) _mm256_storeu_ps(out + h * NV * 8 + 8 * i, acc[h * NV + i]);
}

// The weighted sums of `g` heads (weights rows of `stride`) over `n` value rows `vstride` apart,
// added to out, fused where registers allow.
template <class E>
void weighted_sums(bool avx2, const float* w, int64_t stride, int64_t g, const typename E::T* v,
                   int64_t vstride, int64_t n, int64_t d, float* out) {
  if (avx2) {
    const int64_t nv = d / 8;
    if (d % 8 == 0) {
      if (nv == 2 && g == 1) return weighted_sum_avx2<2, 1, E>(w, stride, v, vstride, n, out);
      if (nv == 2 && g == 2) return weighted_sum_avx2<2, 2, E>(w, stride, v, vstride, n, out);
      if (nv == 2 && g == 4) return weighted_sum_avx2<2, 4, E>(w, stride, v, vstride, n, out);
      if (nv == 4 && g == 1) return weighted_sum_avx2<4, 1, E>(w, stride, v, vstride, n, out);
      if (nv == 4 && g == 2) return weighted_sum_avx2<4, 2, E>(w, stride, v, vstride, n, out);
      if (nv == 8 && g == 1) return weighted_sum_avx2<8, 1, E>(w, stride, v, vstride, n, out);
      if (nv == 16 && g == 1) return weighted_sum_avx2<16, 1, E>(w, stride, v, vstride, n, out);
      if (g > 1) {  // one head at a time
        for (int64_t h = 0; h < g; ++h)
          weighted_sums<E>(avx2, w + h * stride, stride, 1, v, vstride, n, d, out + h * d);
        return;
      }
    }
  }
  for (int64_t h = 0; h < g; ++h) {
    float* o = out + h * d;
    for (int64_t p = 0; p < n; ++p) {
      if (avx2)
        axpy_avx2<E>(w[h * stride + p], v + p * vstride, o, d);
      else
        axpy_portable<E>(w[h * stride + p], v + p * vstride, o, d);
    }
  }
}

// Prefetches `rows` rows of `bytes` each, `stride` elements apart, into L1.
template <class T>
void prefetch_rows(const T* p, int64_t rows, int64_t stride, int64_t bytes) {
  for (int64_t r = 0; r < rows; ++r, p += stride)
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
}

// One (sequence, kv head): the group's query heads against the sequence's context, block by
// block of the paged cache. Each block is a page of its own somewhere in the pool, where the
// hardware prefetcher starts over, so the next block's rows are prefetched while this one is
// computed. Pass 1: the scores of every head of the group, 8 rows at a time (the 8 key rows
// stay in L1 for the group's heads); then a softmax per head, whose 1/sum is applied to the
// output at the end; pass 2: the weighted sums of the values, accumulated in registers.
template <class E>
void attend(const DecodeAttentionArgs& a, bool avx2, int64_t s, int64_t j, std::vector<float>& scores) {
  using T = typename E::T;
  const int64_t d = a.head_dim, h_kv = a.n_kv_head, g = a.n_head / h_kv, ctx = a.context_len[s];
  const int64_t bs = a.block_size;
  const std::vector<int64_t>& table = *a.tables[s];
  const float* q = a.q + (a.rows[s] * a.n_head + j * g) * d;
  float* out = a.out + (a.rows[s] * a.n_head + j * g) * d;
  const int64_t row_stride = h_kv * d;  // between consecutive slots
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(T));
  const int64_t n_blocks = (ctx + bs - 1) / bs;
  auto rows_in = [&](int64_t b) { return std::min(bs, ctx - b * bs); };
  auto base = [&](const void* cache, int64_t b) {
    return static_cast<const T*>(cache) + (table[b] * bs * h_kv + j) * d;
  };
  constexpr int64_t kChunk = 8;
  scores.resize(static_cast<size_t>(g * ctx + g));  // the scores, then 1/sum of each head
  float* inv = scores.data() + g * ctx;
  const bool vec8 = avx2 && d % 8 == 0;
  prefetch_rows(base(a.k_cache, 0), rows_in(0), row_stride, row_bytes);
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (b + 1 < n_blocks) prefetch_rows(base(a.k_cache, b + 1), rows_in(b + 1), row_stride, row_bytes);
    const T* k = base(a.k_cache, b);
    const int64_t n = rows_in(b), p0 = b * bs;
    int64_t r = 0;
    float* dst = scores.data() + p0;
    if (vec8 && d == 16 && g <= 2) {  // small heads: each key row loaded once for the group
      for (; r + kChunk <= n; r += kChunk) {
        if (g == 2)
          dot8x16_avx2<2, E>(q, k + r * row_stride, row_stride, dst + r, ctx);
        else
          dot8x16_avx2<1, E>(q, k + r * row_stride, row_stride, dst + r, ctx);
      }
    } else if (vec8) {
      for (; r + kChunk <= n; r += kChunk)
        for (int64_t h = 0; h < g; ++h) dot8_avx2<E>(q + h * d, k + r * row_stride, row_stride, d, dst + h * ctx + r);
    }
    for (; r < n; ++r)
      for (int64_t h = 0; h < g; ++h)
        scores[h * ctx + p0 + r] = avx2 ? dot_avx2<E>(q + h * d, k + r * row_stride, d)
                                        : dot_portable<E>(q + h * d, k + r * row_stride, d);
  }
  for (int64_t h = 0; h < g; ++h) {  // scale > 0: the largest scaled score is scale * max
    float* sc = scores.data() + h * ctx;
    float sum = 0;
    if (avx2) {
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
  prefetch_rows(base(a.v_cache, 0), rows_in(0), row_stride, row_bytes);
  for (int64_t b = 0; b < n_blocks; ++b) {
    if (b + 1 < n_blocks) prefetch_rows(base(a.v_cache, b + 1), rows_in(b + 1), row_stride, row_bytes);
    weighted_sums<E>(avx2, scores.data() + b * bs, ctx, g, base(a.v_cache, b), row_stride, rows_in(b), d, out);
  }
  for (int64_t h = 0; h < g; ++h)
    for (int64_t x = 0; x < d; ++x) out[h * d + x] *= inv[h];
}

template <class E>
void attend_all(const DecodeAttentionArgs& a, bool avx2) {
  const int64_t n = static_cast<int64_t>(a.rows.size());
  at::parallel_for(0, n * a.n_kv_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t i = begin; i < end; ++i) attend<E>(a, avx2, i / a.n_kv_head, i % a.n_kv_head, scores);
  });
}

}  // namespace

bool decode_attention_cpu_supports(c10::ScalarType kv_dtype) {
  return kv_dtype == at::kFloat || kv_dtype == at::kBFloat16 || kv_dtype == at::kHalf;
}

void decode_attention_cpu(const DecodeAttentionArgs& a) {
  const bool avx2 = has_avx2_fma() && has_f16c();
  switch (a.kv_dtype) {
    case at::kFloat: return attend_all<F32>(a, avx2);
    case at::kBFloat16: return attend_all<BF16>(a, avx2);
    case at::kHalf: return attend_all<F16>(a, avx2);
    default: ANDY_CHECK(false, "decode_attention_cpu: KV cache dtype ", a.kv_dtype, " (fp32, bf16 or fp16 expected)");
  }
}

}  // namespace andy
