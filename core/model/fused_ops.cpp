// Fused CPU kernels (see fused_ops.h). The kernels sit between `#pragma GCC target("avx2,fma")`
// and its pop, so GCC vectorizes their loops with AVX2; they run only where has_avx2_fma().
// Reductions keep 8 partial sums (the compiler may not reorder float additions on its own).
#include "core/model/fused_ops.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/base/cuda_kernel_args.h"
#include "core/base/error.h"
#include "core/base/torch_compat.h"
#include "core/base/avx2_math.h"
#include "parallel/cpu_gemm.h"

namespace andy {

namespace {

inline float to_f(float v) { return v; }
inline float to_f(c10::BFloat16 v) { return static_cast<float>(v); }
template <typename T>
inline T from_f(float v) { return static_cast<T>(v); }
// The value as x's dtype would hold it (bf16 rounding, as the composite's .to(dtype)).
template <typename T>
inline float round_as(float v) { return static_cast<float>(static_cast<T>(v)); }


#pragma GCC push_options
#pragma GCC target("avx2,fma")


inline float dot(const float* a, const float* b, int64_t d) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

// One row of T as floats in `buf` (no copy for fp32).
template <typename T>
inline const float* row_as_float(const T* src, int64_t d, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < d; ++i) buf[i] = to_f(src[i]);
    return buf;
  }
}

// One row: y = w * round_T(x * rstd) stored as Y, x given as floats; returns rstd.
template <typename T, typename Y>
inline float rms_forward_row(const float* xr, const float* w, Y* yr, int64_t d, float eps) {
  const float rs = 1.0f / std::sqrt(dot(xr, xr, d) / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) yr[i] = from_f<Y>(w[i] * round_as<T>(xr[i] * rs));
  return rs;
}

// y = w * round_T(x * rstd) per row, stored as Y; rstd saved for backward unless null.
template <typename T, typename Y = float>
void rms_forward_kernel(const T* x, const float* w, Y* y, float* rstd, int64_t rows, int64_t d,
                        float eps) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : d);
    for (int64_t r = begin; r < end; ++r) {
      const float rs = rms_forward_row<T, Y>(row_as_float(x + r * d, d, buf.data()), w, y + r * d, d, eps);
      if (rstd) rstd[r] = rs;
    }
  });
}

// fp32 rows: h = x + a (h may be x: the sum in place), then y = rms_forward_kernel's norm of h,
// row by row; rstd saved unless null.
void add_rms_forward_kernel(const float* x, const float* a, const float* w, float* h, float* y, float* rstd,
                            int64_t rows, int64_t d, float eps) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * d, *ar = a + r * d;
      float* hr = h + r * d;
      for (int64_t i = 0; i < d; ++i) hr[i] = xr[i] + ar[i];
      const float rs = rms_forward_row<float, float>(hr, w, y + r * d, d, eps);
      if (rstd) rstd[r] = rs;
    }
  });
}

// dx = rstd * (gh - xn * mean(gh * xn)) with gh = dy * w (rounded to T as the composite's
// gradient is) and xn = x * rstd; dw += dy * round_T(xn), summed per thread into dw_parts.
// With `add` (fp32 only: add_rms_norm's backward), dx += add in the same pass.
template <typename T>
void rms_backward_kernel(const float* dy, const T* x, const float* w, const float* rstd, T* dx,
                         float* dw_parts, int64_t rows, int64_t d, const float* add = nullptr) {
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    float* dw = dw_parts + static_cast<int64_t>(at::get_thread_num()) * d;
    std::vector<float> xbuf(std::is_same_v<T, float> ? 0 : d), gh(d), xn(d);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = row_as_float(x + r * d, d, xbuf.data());
      const float* dyr = dy + r * d;
      const float rs = rstd[r];
      for (int64_t i = 0; i < d; ++i) {
        gh[i] = round_as<T>(dyr[i] * w[i]);
        xn[i] = xr[i] * rs;
        dw[i] += dyr[i] * round_as<T>(xn[i]);
      }
      const float m = dot(gh.data(), xn.data(), d) / static_cast<float>(d);
      T* dxr = dx + r * d;
      for (int64_t i = 0; i < d; ++i) dxr[i] = from_f<T>(rs * (gh[i] - xn[i] * m));
      // A loop of its own: in the one above GCC would fuse the add into a multiply-add, one
      // rounding where autograd's sum of the two gradients has two.
      if constexpr (std::is_same_v<T, float>)
        if (add)
          for (int64_t i = 0; i < d; ++i) dxr[i] += add[r * d + i];
    }
  });
}

// sigmoid of n (<= 256) floats.
inline void sigmoid_block(const float* g, float* s, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(zero, _mm256_loadu_ps(g + i)));
    _mm256_storeu_ps(s + i, _mm256_div_ps(one, _mm256_add_ps(one, e)));
  }
  for (; i < n; ++i) s[i] = 1.0f / (1.0f + std::exp(-g[i]));
}

constexpr int64_t kBlock = 256;

// Runs f(lo, hi) over [0, n) in parallel, in chunks of whole kBlock blocks.
template <typename F>
void for_element_blocks(int64_t n, F&& f) {
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 64,
                   [&](int64_t begin, int64_t end) { f(begin * kBlock, std::min(n, end * kBlock)); });
}

// Runs f(o, m, g, s) over blocks of at most kBlock elements, in parallel: elements o..o+m-1
// of `gate` as floats in g, their sigmoids in s.
template <typename T, typename F>
void for_gate_blocks(const T* gate, int64_t n, F&& f) {
  for_element_blocks(n, [&](int64_t lo, int64_t hi) {
    float g[kBlock], s[kBlock];
    for (int64_t o = lo; o < hi; o += kBlock) {
      const int64_t m = std::min(kBlock, hi - o);
      for (int64_t i = 0; i < m; ++i) g[i] = to_f(gate[o + i]);
      sigmoid_block(g, s, m);
      f(o, m, g, s);
    }
  });
}

template <typename T>
void swiglu_forward_kernel(const T* g, const T* u, T* out, int64_t n) {
  for_gate_blocks(g, n, [&](int64_t o, int64_t m, const float* gf, const float* s) {
    for (int64_t i = 0; i < m; ++i) out[o + i] = from_f<T>(gf[i] * s[i] * to_f(u[o + i]));
  });
}

template <typename T>
void swiglu_backward_kernel(const T* dy, const T* g, const T* u, T* dg, T* du, int64_t n) {
  for_gate_blocks(g, n, [&](int64_t o, int64_t m, const float* gf, const float* s) {
    for (int64_t i = 0; i < m; ++i) {
      const float d = to_f(dy[o + i]), gi = gf[i], si = s[i];
      dg[o + i] = from_f<T>(d * to_f(u[o + i]) * si * (1.0f + gi * (1.0f - si)));
      du[o + i] = from_f<T>(d * gi * si);
    }
  });
}

// Rotate-half RoPE over rows of width d (rows = B*T*H, each row's cos/sin row = row / H).
// sign = +1 forward; -1 backward (the transpose: sin taken at the partner's index, negated).
template <typename T>
void rope_kernel(const T* x, const float* cos, const float* sin, T* y, int64_t rows, int64_t heads,
                 int64_t d, bool backward) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : d);
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = row_as_float(x + r * d, d, buf.data());
      const float* c = cos + (r / heads) * d;
      const float* s = sin + (r / heads) * d;
      T* yr = y + r * d;
      if (!backward) {
        for (int64_t i = 0; i < half; ++i) yr[i] = from_f<T>(xr[i] * c[i] - xr[i + half] * s[i]);
        for (int64_t i = half; i < d; ++i) yr[i] = from_f<T>(xr[i] * c[i] + xr[i - half] * s[i]);
      } else {
        for (int64_t i = 0; i < half; ++i)
          yr[i] = from_f<T>(xr[i] * c[i] + xr[i + half] * s[i + half]);
        for (int64_t i = half; i < d; ++i)
          yr[i] = from_f<T>(xr[i] * c[i] - xr[i - half] * s[i - half]);
      }
    }
  });
}

void adamw_kernel(float* p, const float* g, float* m, float* v, int64_t n, const AdamWHyper& h) {
  const float decay = static_cast<float>(1.0 - h.lr * h.weight_decay);
  const bool do_decay = h.weight_decay > 0;
  const float b1 = static_cast<float>(h.beta1), one_b1 = static_cast<float>(1.0 - h.beta1);
  const float b2 = static_cast<float>(h.beta2), one_b2 = static_cast<float>(1.0 - h.beta2);
  const float sqrt_bc2 = static_cast<float>(std::sqrt(h.bc2)), eps = static_cast<float>(h.eps);
  const float step = static_cast<float>(-h.lr / h.bc1);
  const float gs = static_cast<float>(h.grad_scale);
  const bool scaled = h.grad_scale != 1.0;
  at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
    // 8 at a time (GCC does not vectorize the loop below at -O2: it ran scalar divisions and
    // square roots, 5.7 % of a 25 M fp32 step), the same operations in the same order.
    const __m256 vdecay = _mm256_set1_ps(decay), vb1 = _mm256_set1_ps(b1), v1b1 = _mm256_set1_ps(one_b1);
    const __m256 vb2 = _mm256_set1_ps(b2), v1b2 = _mm256_set1_ps(one_b2), vbc2 = _mm256_set1_ps(sqrt_bc2);
    const __m256 veps = _mm256_set1_ps(eps), vstep = _mm256_set1_ps(step), vgs = _mm256_set1_ps(gs);
    int64_t i = begin;
    for (; i + 8 <= end; i += 8) {
      __m256 pv = _mm256_loadu_ps(p + i);
      if (do_decay) pv = _mm256_mul_ps(pv, vdecay);
      __m256 gv = _mm256_loadu_ps(g + i);
      if (scaled) gv = _mm256_mul_ps(gv, vgs);
      const __m256 mv = _mm256_fmadd_ps(_mm256_loadu_ps(m + i), vb1, _mm256_mul_ps(v1b1, gv));
      const __m256 vv = _mm256_fmadd_ps(_mm256_loadu_ps(v + i), vb2, _mm256_mul_ps(v1b2, _mm256_mul_ps(gv, gv)));
      _mm256_storeu_ps(m + i, mv);
      _mm256_storeu_ps(v + i, vv);
      const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vv), vbc2), veps);
      _mm256_storeu_ps(p + i, _mm256_fmadd_ps(vstep, _mm256_div_ps(mv, denom), pv));
    }
    for (; i < end; ++i) {
      float pi = do_decay ? p[i] * decay : p[i];
      const float gi = scaled ? g[i] * gs : g[i];
      const float mi = m[i] * b1 + one_b1 * gi;
      const float vi = v[i] * b2 + one_b2 * (gi * gi);
      m[i] = mi;
      v[i] = vi;
      p[i] = pi + step * (mi / (std::sqrt(vi) / sqrt_bc2 + eps));
    }
  });
}

// Causal softmax of one row of scores: p[j] = softmax(scale * x)[j] over j < n, 0 for j >= n
// (the masked positions). `x` as floats, `p` written as T.
template <typename T>
void causal_softmax_row(const float* x, int64_t n, int64_t s, float scale, T* p, float* e) {
  const float shift = max_avx2(x, n) * scale;
  const __m256 sv = _mm256_set1_ps(scale), shv = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(x + j), sv, shv));
    _mm256_storeu_ps(e + j, v);
    acc = _mm256_add_ps(acc, v);
  }
  float sum = hsum8_pairs(acc);
  for (; j < n; ++j) {
    e[j] = std::exp(x[j] * scale - shift);
    sum += e[j];
  }
  const float inv = 1.0f / sum;
  for (j = 0; j < n; ++j) p[j] = from_f<T>(e[j] * inv);
  for (; j < s; ++j) p[j] = from_f<T>(0.0f);
}

// Rows of [R, S] scores; row r is query r % t at position q_offset + r % t, which sees keys
// 0..position.
template <typename T>
void causal_softmax_forward_kernel(const T* x, T* p, int64_t rows, int64_t s, int64_t t, int64_t q_offset,
                                   float scale) {
  at::parallel_for(0, rows, row_grain(s), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(std::is_same_v<T, float> ? 0 : s), e(s);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = std::min(s, q_offset + r % t + 1);
      const float* xr = row_as_float(x + r * s, n, buf.data());
      causal_softmax_row<T>(xr, n, s, scale, p + r * s, e.data());
    }
  });
}

// One row of the causal softmax's backward: dx = scale * p * (dp - sum(dp * p)) over the n visible
// keys, 0 up to s. dx may be dp (each element is read before it is written).
template <typename T>
void causal_softmax_backward_row(const float* p, const float* dp, int64_t n, int64_t s, float scale, T* dx) {
  const float dot_pd = dot(p, dp, n);
  int64_t j = 0;
  for (; j < n; ++j) dx[j] = from_f<T>(scale * p[j] * (dp[j] - dot_pd));
  for (; j < s; ++j) dx[j] = from_f<T>(0.0f);
}

template <typename T>
void causal_softmax_backward_kernel(const T* dp, const T* p, T* dx, int64_t rows, int64_t s, int64_t t,
                                    int64_t q_offset, float scale) {
  at::parallel_for(0, rows, row_grain(s), [&](int64_t begin, int64_t end) {
    std::vector<float> bp(std::is_same_v<T, float> ? 0 : s), bd(std::is_same_v<T, float> ? 0 : s);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = std::min(s, q_offset + r % t + 1);
      const float* pr = row_as_float(p + r * s, n, bp.data());
      const float* dr = row_as_float(dp + r * s, n, bd.data());
      causal_softmax_backward_row<T>(pr, dr, n, s, scale, dx + r * s);
    }
  });
}

// Sum of x[0..n)^2, accumulated in double (4 vectors of 4 lanes).
double sum_sq_chunk(const float* x, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), a3 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 u = _mm256_loadu_ps(x + i), w = _mm256_loadu_ps(x + i + 8);
    const __m256d u0 = _mm256_cvtps_pd(_mm256_castps256_ps128(u)), u1 = _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1));
    const __m256d w0 = _mm256_cvtps_pd(_mm256_castps256_ps128(w)), w1 = _mm256_cvtps_pd(_mm256_extractf128_ps(w, 1));
    a0 = _mm256_fmadd_pd(u0, u0, a0);
    a1 = _mm256_fmadd_pd(u1, u1, a1);
    a2 = _mm256_fmadd_pd(w0, w0, a2);
    a3 = _mm256_fmadd_pd(w1, w1, a3);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return s;
}

#pragma GCC pop_options

// GCC 12's AVX-512 intrinsics build their "undefined" vectors by self-initialization, which
// -Wmaybe-uninitialized reports at every inlined use (a false positive; GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#define ANDY_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))

// 1 / (1 + e^-g), 16 lanes.
ANDY_AVX512 inline __m512 sigmoid16(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

// swiglu_forward_kernel / swiglu_backward_kernel for fp32 in one pass of 16 lanes over elements
// [lo, hi) (the AVX2 kernels take the sigmoids of 256 elements into a buffer, then a second loop;
// one thread, 1.44 M elements (a 25 M model layer): forward 1.1-1.5 -> 0.7-1.1 ns per element,
// backward 2.0-2.3 -> 1.5-1.9).
ANDY_AVX512 void swiglu_forward_f32_avx512(const float* g, const float* u, float* out, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; i += 16) {
    const __mmask16 m = first_lanes16(hi - i);
    const __m512 gv = _mm512_maskz_loadu_ps(m, g + i), uv = _mm512_maskz_loadu_ps(m, u + i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid16(gv)), uv));
  }
}

ANDY_AVX512 void swiglu_backward_f32_avx512(const float* dy, const float* g, const float* u, float* dg, float* du,
                                            int64_t lo, int64_t hi) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = lo; i < hi; i += 16) {
    const __mmask16 m = first_lanes16(hi - i);
    const __m512 d = _mm512_maskz_loadu_ps(m, dy + i), gv = _mm512_maskz_loadu_ps(m, g + i),
                 uv = _mm512_maskz_loadu_ps(m, u + i);
    const __m512 s = sigmoid16(gv);
    // dg = dy u s (1 + g (1 - s)), du = dy g s
    const __m512 dus = _mm512_mul_ps(_mm512_mul_ps(d, uv), s);
    _mm512_mask_storeu_ps(dg + i, m, _mm512_mul_ps(dus, _mm512_fmadd_ps(gv, _mm512_sub_ps(one, s), one)));
    _mm512_mask_storeu_ps(du + i, m, _mm512_mul_ps(_mm512_mul_ps(d, gv), s));
  }
}

// rms_backward_kernel's rows [begin, end) for fp32, 16 lanes: a pass over the row for dw and
// sum(gh * xn), a second for dx (gh and xn computed again instead of kept in buffers), then
// `add` in a loop of its own (as rms_backward_kernel, for autograd's two roundings). One thread,
// x + delta and its norm over [1024, 512] through autograd (add_rms_norm), backward: 1.5-1.9 ms
// with rms_backward_kernel, 0.8-1.3 ms with this.
ANDY_AVX512 void rms_backward_rows_f32_avx512(const float* dy, const float* x, const float* w, const float* rstd,
                                              float* dx, float* dw, int64_t begin, int64_t end, int64_t d,
                                              const float* add) {
  for (int64_t r = begin; r < end; ++r) {
    const float *xr = x + r * d, *dyr = dy + r * d;
    const __m512 rs = _mm512_set1_ps(rstd[r]);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= d; i += 32) {
      const __m512 dy0 = _mm512_loadu_ps(dyr + i), dy1 = _mm512_loadu_ps(dyr + i + 16);
      const __m512 xn0 = _mm512_mul_ps(_mm512_loadu_ps(xr + i), rs), xn1 = _mm512_mul_ps(_mm512_loadu_ps(xr + i + 16), rs);
      _mm512_storeu_ps(dw + i, _mm512_fmadd_ps(dy0, xn0, _mm512_loadu_ps(dw + i)));
      _mm512_storeu_ps(dw + i + 16, _mm512_fmadd_ps(dy1, xn1, _mm512_loadu_ps(dw + i + 16)));
      acc0 = _mm512_fmadd_ps(_mm512_mul_ps(dy0, _mm512_loadu_ps(w + i)), xn0, acc0);
      acc1 = _mm512_fmadd_ps(_mm512_mul_ps(dy1, _mm512_loadu_ps(w + i + 16)), xn1, acc1);
    }
    for (; i < d; i += 16) {
      const __mmask16 k = first_lanes16(d - i);
      const __m512 dyv = _mm512_maskz_loadu_ps(k, dyr + i), xn = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, xr + i), rs);
      _mm512_mask_storeu_ps(dw + i, k, _mm512_fmadd_ps(dyv, xn, _mm512_maskz_loadu_ps(k, dw + i)));
      acc0 = _mm512_fmadd_ps(_mm512_mul_ps(dyv, _mm512_maskz_loadu_ps(k, w + i)), xn, acc0);
    }
    const __m512 m = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) / static_cast<float>(d));
    float* dxr = dx + r * d;
    for (i = 0; i < d; i += 16) {
      const __mmask16 k = first_lanes16(d - i);
      const __m512 gh = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, dyr + i), _mm512_maskz_loadu_ps(k, w + i));
      const __m512 xn = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, xr + i), rs);
      _mm512_mask_storeu_ps(dxr + i, k, _mm512_mul_ps(rs, _mm512_fnmadd_ps(xn, m, gh)));
    }
    if (add)
      for (i = 0; i < d; ++i) dxr[i] += add[r * d + i];
  }
}

// rms_backward_kernel, through rms_backward_rows_f32_avx512 for fp32 where the CPU has AVX-512.
template <typename T>
void rms_backward(const float* dy, const T* x, const float* w, const float* rstd, T* dx, float* dw_parts,
                  int64_t rows, int64_t d, const float* add = nullptr) {
  if constexpr (std::is_same_v<T, float>) {
    if (has_avx512_bw_vl()) {
      at::parallel_for(0, rows, row_grain(d), [&](int64_t begin, int64_t end) {
        rms_backward_rows_f32_avx512(dy, x, w, rstd, dx, dw_parts + static_cast<int64_t>(at::get_thread_num()) * d,
                                     begin, end, d, add);
      });
      return;
    }
  }
  rms_backward_kernel<T>(dy, x, w, rstd, dx, dw_parts, rows, d, add);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct RmsNormFn : public torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& w_in,
                            double eps) {
    const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(1, d);
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(at::kFloat));
    at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
    on_float_or_bf16(x, [&](auto t) {
      using T = decltype(t);
      rms_forward_kernel<T>(x.data_ptr<T>(), w.data_ptr<float>(), y.data_ptr<float>(),
                            rstd.data_ptr<float>(), rows, d, static_cast<float>(eps));
    });
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    const at::Tensor dy = grads[0].to(at::kFloat).contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(1, d);
    at::Tensor dx = at::empty(x.sizes(), x.options());
    at::Tensor parts = at::zeros({at::get_num_threads(), d}, x.options().dtype(at::kFloat));
    on_float_or_bf16(x, [&](auto t) {
      using T = decltype(t);
      rms_backward<T>(dy.data_ptr<float>(), x.data_ptr<T>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                      dx.data_ptr<T>(), parts.data_ptr<float>(), rows, d);
    });
    return {dx, parts.sum(0), at::Tensor()};
  }
};

// h = x + delta and y = rms_norm(h) (fp32, CPU): one pass forward; backward dx = ddelta = dh +
// the norm's input gradient, in the norm's backward pass.
struct AddRmsNormFn : public torch::autograd::Function<AddRmsNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x_in, const at::Tensor& delta_in,
                               const at::Tensor& w_in, double eps) {
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined
    const at::Tensor x = x_in.contiguous(), delta = delta_in.contiguous(), w = w_in.contiguous();
    const int64_t d = x.size(-1), rows = x.numel() / std::max<int64_t>(1, d);
    at::Tensor h = at::empty(x.sizes(), x.options()), y = at::empty(x.sizes(), x.options());
    at::Tensor rstd = at::empty({rows}, x.options());
    add_rms_forward_kernel(x.data_ptr<float>(), delta.data_ptr<float>(), w.data_ptr<float>(), h.data_ptr<float>(),
                           y.data_ptr<float>(), rstd.data_ptr<float>(), rows, d, static_cast<float>(eps));
    ctx->save_for_backward({h, w, rstd});
    return {h, y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &w = saved[1], &rstd = saved[2];
    const at::Tensor dh = grads[0].defined() ? grads[0].contiguous() : at::Tensor();
    if (!grads[1].defined()) return {dh, dh, at::Tensor(), at::Tensor()};
    const at::Tensor dy = grads[1].contiguous();
    const int64_t d = h.size(-1), rows = h.numel() / std::max<int64_t>(1, d);
    at::Tensor dx = at::empty(h.sizes(), h.options());
    at::Tensor parts = at::zeros({at::get_num_threads(), d}, h.options());
    rms_backward<float>(dy.data_ptr<float>(), h.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                        dx.data_ptr<float>(), parts.data_ptr<float>(), rows, d,
                        dh.defined() ? dh.data_ptr<float>() : nullptr);
    return {dx, dx, parts.sum(0), at::Tensor()};
  }
};

// silu(gate) * up with its backward, around the kernels of `Kernels` (the CPU ones below, the
// CUDA ones under ANDYLLM_CUDA_KERNELS): forward(g, u, out) and backward(dy, g, u, dg, du) on
// contiguous tensors of one dtype.
template <typename Kernels>
struct SwigluFnT : public torch::autograd::Function<SwigluFnT<Kernels>> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g_in, const at::Tensor& u_in) {
    const at::Tensor g = g_in.contiguous(), u = u_in.contiguous();
    at::Tensor out = at::empty(g.sizes(), g.options());
    Kernels::forward(g, u, out);
    ctx->save_for_backward({g, u});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &u = saved[1];
    const at::Tensor dy = grads[0].to(g.scalar_type()).contiguous();
    at::Tensor dg = at::empty(g.sizes(), g.options()), du = at::empty(g.sizes(), g.options());
    Kernels::backward(dy, g, u, dg, du);
    return {dg, du};
  }
};

struct SwigluCpuKernels {
  static void forward(const at::Tensor& g, const at::Tensor& u, at::Tensor& out) {
    on_float_or_bf16(g, [&](auto t) {
      using T = decltype(t);
      if constexpr (std::is_same_v<T, float>) {
        if (has_avx512_bw_vl())
          return for_element_blocks(g.numel(), [&](int64_t lo, int64_t hi) {
            swiglu_forward_f32_avx512(g.data_ptr<T>(), u.data_ptr<T>(), out.data_ptr<T>(), lo, hi);
          });
      }
      swiglu_forward_kernel<T>(g.data_ptr<T>(), u.data_ptr<T>(), out.data_ptr<T>(), g.numel());
    });
  }
  static void backward(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& dg, at::Tensor& du) {
    on_float_or_bf16(g, [&](auto t) {
      using T = decltype(t);
      if constexpr (std::is_same_v<T, float>) {
        if (has_avx512_bw_vl())
          return for_element_blocks(g.numel(), [&](int64_t lo, int64_t hi) {
            swiglu_backward_f32_avx512(dy.data_ptr<T>(), g.data_ptr<T>(), u.data_ptr<T>(), dg.data_ptr<T>(),
                                       du.data_ptr<T>(), lo, hi);
          });
      }
      swiglu_backward_kernel<T>(dy.data_ptr<T>(), g.data_ptr<T>(), u.data_ptr<T>(), dg.data_ptr<T>(),
                                du.data_ptr<T>(), g.numel());
    });
  }
};
using SwigluFn = SwigluFnT<SwigluCpuKernels>;

struct RopeFn : public torch::autograd::Function<RopeFn> {
  static at::Tensor run(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin,
                        bool backward) {
    const at::Tensor x = x_in.contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options());
    const int64_t heads = x.size(2), d = x.size(3);
    on_float_or_bf16(x, [&](auto t) {
      using T = decltype(t);
      rope_kernel<T>(x.data_ptr<T>(), cos.data_ptr<float>(), sin.data_ptr<float>(), y.data_ptr<T>(),
                     x.numel() / d, heads, d, backward);
    });
    return y;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos_in,
                            const at::Tensor& sin_in) {
    const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
    ctx->save_for_backward({cos, sin});
    return run(x, cos, sin, false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    return {run(grads[0], saved[0], saved[1], true), at::Tensor(), at::Tensor()};
  }
};

#if ANDYLLM_CUDA_KERNELS
// ---- the CUDA counterparts (core/base/cuda_kernels.cu) ------------------------------------

struct SwigluCudaKernels {
  static void forward(const at::Tensor& g, const at::Tensor& u, at::Tensor& out) {
    cuda::swiglu_forward(cuda_dtype(g), g.data_ptr(), u.data_ptr(), out.data_ptr(), g.numel(), cuda_stream_for(g));
  }
  static void backward(const at::Tensor& dy, const at::Tensor& g, const at::Tensor& u, at::Tensor& dg, at::Tensor& du) {
    cuda::swiglu_backward(cuda_dtype(g), dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(), du.data_ptr(),
                          g.numel(), cuda_stream_for(g));
  }
};
using SwigluCudaFn = SwigluFnT<SwigluCudaKernels>;

struct RopeCudaFn : public torch::autograd::Function<RopeCudaFn> {
  static at::Tensor run(const at::Tensor& x_in, const at::Tensor& cos, const at::Tensor& sin, bool backward) {
    const at::Tensor x = x_in.contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options());
    const int64_t heads = x.size(2), d = x.size(3);
    (backward ? cuda::rope_backward : cuda::rope_forward)(cuda_dtype(x), x.data_ptr(), cos.data_ptr<float>(),
                                                          sin.data_ptr<float>(), y.data_ptr(), x.numel() / d / heads,
                                                          heads, d, cuda_stream_for(x));
    return y;
  }

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos_in,
                            const at::Tensor& sin_in) {
    const at::Tensor cos = cos_in.to(at::kFloat).contiguous(), sin = sin_in.to(at::kFloat).contiguous();
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    return run(x, cos, sin, false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {run(grads[0].to(dtype), saved[0], saved[1], true), at::Tensor(), at::Tensor()};
  }
};
#endif  // ANDYLLM_CUDA_KERNELS

struct CausalSoftmaxFn : public torch::autograd::Function<CausalSoftmaxFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_in, double scale, int64_t q_offset) {
    const at::Tensor x = x_in.contiguous();
    const int64_t s = x.size(-1), t = x.size(-2), rows = x.numel() / std::max<int64_t>(1, s);
    at::Tensor p = at::empty(x.sizes(), x.options());
    on_float_or_bf16(x, [&](auto tag) {
      using T = decltype(tag);
      causal_softmax_forward_kernel<T>(x.data_ptr<T>(), p.data_ptr<T>(), rows, s, t, q_offset,
                                       static_cast<float>(scale));
    });
    ctx->save_for_backward({p});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["q_offset"] = q_offset;
    return p;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor p = ctx->get_saved_variables()[0];
    const at::Tensor dp = grads[0].to(p.scalar_type()).contiguous();
    const double scale = ctx->saved_data["scale"].toDouble();
    const int64_t q_offset = ctx->saved_data["q_offset"].toInt();
    const int64_t s = p.size(-1), t = p.size(-2), rows = p.numel() / std::max<int64_t>(1, s);
    at::Tensor dx = at::empty(p.sizes(), p.options());
    on_float_or_bf16(p, [&](auto tag) {
      using T = decltype(tag);
      causal_softmax_backward_kernel<T>(dp.data_ptr<T>(), p.data_ptr<T>(), dx.data_ptr<T>(), rows, s, t, q_offset,
                                        static_cast<float>(scale));
    });
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// causal_attention_cpu (fused_ops.h). For each (sequence b, kv head j), each of its g query heads
// h and each block of query rows [t0, t1), the keys it sees are [0, t1):
//   S = Q[t0:t1] K[0:t1]^T, P = causal softmax(scale S) (row t sees keys 0..t; zeros up to t1),
//   O[t0:t1] = P V[0:t1];
// backward with dO:
//   dP = dO[t0:t1] V[0:t1]^T, dS = scale P (dP - rowsum(P dP)), dQ[t0:t1] = dS K[0:t1],
//   dK[0:t1] += dS^T Q[t0:t1], dV[0:t1] += P^T dO[t0:t1].
// P is kept for the backward in a [B, H, T, T] buffer of which only those blocks are written.
// The tasks are the (b, j) pairs: a kv head's gradients are summed by one task.
struct CausalAttentionFn : public torch::autograd::Function<CausalAttentionFn> {
  struct Shape {
    int64_t b, t, h, h_kv, d, g;
    explicit Shape(const at::Tensor& q, const at::Tensor& k)
        : b(q.size(0)), t(q.size(1)), h(q.size(2)), h_kv(k.size(2)), d(q.size(3)), g(q.size(2) / k.size(2)) {}
    // Row t0 of query head h (or kv head j) in sequence b, and the strides between rows.
    int64_t q_at(int64_t bi, int64_t t0, int64_t hi) const { return ((bi * t + t0) * h + hi) * d; }
    int64_t kv_at(int64_t bi, int64_t t0, int64_t j) const { return ((bi * t + t0) * h_kv + j) * d; }
    int64_t p_at(int64_t bi, int64_t hi, int64_t t0) const { return ((bi * h + hi) * t + t0) * t; }
    int64_t ldq() const { return h * d; }
    int64_t ldkv() const { return h_kv * d; }
  };

  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    const Shape sh(q, k);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sh.d)));
    at::Tensor p = at::empty({sh.b, sh.h, sh.t, sh.t}, q.options());
    at::Tensor o = at::empty(q.sizes(), q.options());
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
    float *pp = p.data_ptr<float>(), *op = o.data_ptr<float>();
    at::parallel_for(0, sh.b * sh.h_kv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> e(static_cast<size_t>(sh.t));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / sh.h_kv, j = task % sh.h_kv;
        for (int64_t hi = j * sh.g; hi < (j + 1) * sh.g; ++hi)
          for (int64_t t0 = 0; t0 < sh.t; t0 += kCausalBlockRows) {
            const int64_t t1 = std::min(sh.t, t0 + kCausalBlockRows), rows = t1 - t0;
            float* pb = pp + sh.p_at(bi, hi, t0);
            cpu_sgemm(false, true, rows, t1, sh.d, qp + sh.q_at(bi, t0, hi), sh.ldq(), kp + sh.kv_at(bi, 0, j),
                      sh.ldkv(), pb, sh.t);
            for (int64_t r = 0; r < rows; ++r)  // in place: the row is read before it is written
              causal_softmax_row<float>(pb + r * sh.t, t0 + r + 1, t1, scale, pb + r * sh.t, e.data());
            cpu_sgemm(false, false, rows, sh.d, t1, pb, sh.t, vp + sh.kv_at(bi, 0, j), sh.ldkv(),
                      op + sh.q_at(bi, t0, hi), sh.ldq());
          }
      }
    });
    ctx->save_for_backward({q, k, v, p});
    return o;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &p = saved[3];
    const at::Tensor dout = grads[0].to(at::kFloat).contiguous();
    const Shape sh(q, k);
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sh.d)));
    at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::zeros(k.sizes(), k.options()),
               dv = at::zeros(v.sizes(), v.options());
    const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>(),
                *pp = p.data_ptr<float>(), *gp = dout.data_ptr<float>();
    float *dqp = dq.data_ptr<float>(), *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
    at::parallel_for(0, sh.b * sh.h_kv, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> ds(static_cast<size_t>(kCausalBlockRows * sh.t));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bi = task / sh.h_kv, j = task % sh.h_kv;
        const float *kj = kp + sh.kv_at(bi, 0, j), *vj = vp + sh.kv_at(bi, 0, j);
        float *dkj = dkp + sh.kv_at(bi, 0, j), *dvj = dvp + sh.kv_at(bi, 0, j);
        for (int64_t hi = j * sh.g; hi < (j + 1) * sh.g; ++hi)
          for (int64_t t0 = 0; t0 < sh.t; t0 += kCausalBlockRows) {
            const int64_t t1 = std::min(sh.t, t0 + kCausalBlockRows), rows = t1 - t0;
            const float* pb = pp + sh.p_at(bi, hi, t0);
            const float* gb = gp + sh.q_at(bi, t0, hi);
            cpu_sgemm(false, true, rows, t1, sh.d, gb, sh.ldq(), vj, sh.ldkv(), ds.data(), t1);  // dP
            for (int64_t r = 0; r < rows; ++r)  // dS in place of dP
              causal_softmax_backward_row<float>(pb + r * sh.t, ds.data() + r * t1, t0 + r + 1, t1, scale,
                                                 ds.data() + r * t1);
            cpu_sgemm(false, false, rows, sh.d, t1, ds.data(), t1, kj, sh.ldkv(), dqp + sh.q_at(bi, t0, hi), sh.ldq());
            cpu_sgemm(true, false, t1, sh.d, rows, ds.data(), t1, qp + sh.q_at(bi, t0, hi), sh.ldq(), dkj, sh.ldkv(),
                      1.0f);
            cpu_sgemm(true, false, t1, sh.d, rows, pb, sh.t, gb, sh.ldq(), dvj, sh.ldkv(), 1.0f);
          }
      }
    });
    return {dq, dk, dv};
  }
};

}  // namespace

bool fused_ops_apply(const at::Tensor& x) {
  return fused_kernels_enabled() && x.is_cpu() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16);
}

at::Tensor add_rms_norm_fp32_(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  const auto f32 = at::kFloat;
  if (at::GradMode::is_enabled() || !fused_kernels_enabled() || !residual.is_cpu() || !delta.is_cpu() ||
      !weight.is_cpu() || residual.scalar_type() != f32 || delta.scalar_type() != f32 || weight.scalar_type() != f32 ||
      !residual.is_contiguous() || delta.sizes() != residual.sizes() || weight.dim() != 1 ||
      residual.size(-1) != weight.size(0))
    return {};
  const at::Tensor dl = delta.contiguous(), w = weight.contiguous();
  const int64_t d = residual.size(-1), rows = residual.numel() / std::max<int64_t>(1, d);
  at::Tensor y = at::empty(residual.sizes(), residual.options());
  add_rms_forward_kernel(residual.data_ptr<float>(), dl.data_ptr<float>(), w.data_ptr<float>(),
                         residual.data_ptr<float>(), y.data_ptr<float>(), nullptr, rows, d, static_cast<float>(eps));
  return y;
}

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                               double eps) {
  const auto f32 = at::kFloat;
  const bool fused = fused_ops_apply(x) && x.scalar_type() == f32 && delta.is_cpu() && delta.scalar_type() == f32 &&
                     delta.sizes() == x.sizes() && weight.is_cpu() && weight.scalar_type() == f32 &&
                     weight.dim() == 1 && x.size(-1) == weight.size(0);
  if (fused) {
    const variable_list hy = AddRmsNormFn::apply(x, delta, weight, eps);
    return {hy[0], hy[1]};
  }
  at::Tensor h = x + delta;
  return {h, rms_norm(h, weight, eps)};
}

at::Tensor rms_norm_unfused(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  at::Tensor var = h.pow(2).mean(-1, /*keepdim=*/true);
  h = h * at::rsqrt(var + eps);
  return weight * h.to(x.scalar_type());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const bool cpu_kernel = fused_ops_apply(x) && weight.is_cpu() && weight.dim() == 1 && x.size(-1) == weight.size(0);
  if (cpu_kernel && weight.scalar_type() == at::kFloat) return RmsNormFn::apply(x, weight, eps);
  // bf16 inference (serve.dtype = bf16: bf16 activations and weight, no gradient): the
  // composite's two roundings, bf16(w * bf16(x * rstd)), in one pass without fp32 temporaries.
  if (cpu_kernel && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
      !(at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad()))) {
    const at::Tensor xc = x.contiguous(), w = weight.to(at::kFloat).contiguous();
    const int64_t d = xc.size(-1), rows = xc.numel() / std::max<int64_t>(1, d);
    at::Tensor y = at::empty(xc.sizes(), xc.options());
    rms_forward_kernel<c10::BFloat16, c10::BFloat16>(xc.data_ptr<c10::BFloat16>(), w.data_ptr<float>(),
                                                     y.data_ptr<c10::BFloat16>(), nullptr, rows, d,
                                                     static_cast<float>(eps));
    return y;
  }
  // CUDA: LibTorch's rms_norm, x and weight of one dtype. For fp32 (the default training
  // residual stream) the composite's arithmetic; for bf16 / fp16 (precision.fp32_residual =
  // false) one rounding at the end where the composite rounds before the scale too.
  if constexpr (compat::kHasNativeRmsNorm) {
    if (fused_ops_requested() && x.is_cuda() && weight.scalar_type() == x.scalar_type() &&
        (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf) &&
        weight.dim() == 1 && x.size(-1) == weight.size(0))
      return compat::native_rms_norm(x, weight, eps);
  }
  return rms_norm_unfused(x, weight, eps);
}

at::Tensor rms_norm_in_dtype(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return rms_norm(x, weight.scalar_type() == x.scalar_type() ? weight : weight.to(x.scalar_type()), eps);
}

at::Tensor swiglu_unfused(const at::Tensor& gate, const at::Tensor& up) { return at::silu(gate) * up; }

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  if (fused_ops_apply(gate) && up.scalar_type() == gate.scalar_type() && up.sizes() == gate.sizes())
    return SwigluFn::apply(gate, up);
#if ANDYLLM_CUDA_KERNELS
  if (cuda_kernels_apply(gate) && up.scalar_type() == gate.scalar_type() && up.sizes() == gate.sizes() &&
      up.device() == gate.device())
    return SwigluCudaFn::apply(gate, up);
#endif
  return swiglu_unfused(gate, up);
}

at::Tensor rope_bthd_unfused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor c = cos.unsqueeze(2).to(x.scalar_type()), s = sin.unsqueeze(2).to(x.scalar_type());
  at::Tensor rotated = at::cat({x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)}, -1);
  return x * c + rotated * s;
}

at::Tensor rope_bthd(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  ANDY_CHECK(x.dim() == 4 && cos.dim() == 3 && x.size(0) == cos.size(0) && x.size(1) == cos.size(1) &&
                 x.size(3) == cos.size(2) && x.size(3) % 2 == 0 && cos.sizes() == sin.sizes(),
             "rope: expected x [B, T, H, d] and cos/sin [B, T, d], got ", x.sizes(), " and ", cos.sizes());
  if (fused_ops_apply(x) && cos.is_cpu()) return RopeFn::apply(x, cos, sin);
#if ANDYLLM_CUDA_KERNELS
  if (cuda_kernels_apply(x) && cos.device() == x.device() && sin.device() == x.device())
    return RopeCudaFn::apply(x, cos, sin);
#endif
  return rope_bthd_unfused(x, cos, sin);
}

void adamw_update_unfused(at::Tensor& param, const at::Tensor& grad_in, at::Tensor& exp_avg,
                          at::Tensor& exp_avg_sq, const AdamWHyper& h) {
  const at::Tensor grad = h.grad_scale != 1.0 ? grad_in * h.grad_scale : grad_in;
  if (h.weight_decay > 0) param.mul_(1.0 - h.lr * h.weight_decay);
  exp_avg.mul_(h.beta1).add_(grad, 1.0 - h.beta1);
  exp_avg_sq.mul_(h.beta2).addcmul_(grad, grad, 1.0 - h.beta2);
  at::Tensor denom = (exp_avg_sq.sqrt() / std::sqrt(h.bc2)).add_(h.eps);
  param.addcdiv_(exp_avg, denom, -h.lr / h.bc1);
}

void adamw_update(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                  at::Tensor& exp_avg_sq, const AdamWHyper& h) {
  auto ok = [](const at::Tensor& t) { return t.is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(); };
  if (fused_kernels_enabled() && ok(param) && ok(grad) && ok(exp_avg) && ok(exp_avg_sq) &&
      grad.numel() == param.numel() && exp_avg.numel() == param.numel() && exp_avg_sq.numel() == param.numel()) {
    adamw_kernel(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                 exp_avg_sq.data_ptr<float>(), param.numel(), h);
    return;
  }
  adamw_update_unfused(param, grad, exp_avg, exp_avg_sq, h);
}

void adamw_update_group(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                        const AdamWHyper& h, int64_t step) {
  ANDY_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
             "adamw_update_group: ", params.size(), " parameters but ", grads.size(), " gradients, ", exp_avgs.size(),
             " and ", exp_avg_sqs.size(), " moments");
  if (params.empty()) return;
  bool multi = compat::kHasFusedAdamw && fused_ops_requested();
  for (size_t i = 0; multi && i < params.size(); ++i)
    for (const at::Tensor* t : {&params[i], &grads[i], &exp_avgs[i], &exp_avg_sqs[i]})
      multi = multi && t->is_cuda() && t->scalar_type() == at::kFloat && t->is_contiguous() &&
              t->device() == params[0].device();
  if (multi) {
    at::NoGradGuard no_grad;
    auto on_device = at::TensorOptions().dtype(at::kFloat).device(params[0].device());
    const at::Tensor step_t = at::full({}, static_cast<double>(step), on_device);
    c10::optional<at::Tensor> divisor;
    if (h.grad_scale != 1.0) divisor = at::full({}, 1.0 / h.grad_scale, on_device);
    // The kernel leaves g / divisor in the gradients (the trainer clears them every step).
    compat::fused_adamw(params, grads, exp_avgs, exp_avg_sqs, step_t, h.lr, h.beta1, h.beta2, h.weight_decay, h.eps,
                        divisor);
    return;
  }
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor p = params[i], m = exp_avgs[i], v = exp_avg_sqs[i];
    adamw_update(p, grads[i], m, v, h);
  }
}

at::Tensor causal_mask(int64_t t, int64_t s, int64_t q_offset, const at::Device& device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor qpos = at::arange(t, opts).add_(q_offset).unsqueeze(1);
  at::Tensor kpos = at::arange(s, opts).unsqueeze(0);
  return kpos.le(qpos);
}

at::Tensor causal_softmax_unfused(const at::Tensor& scores, double scale, int64_t q_offset) {
  const at::Tensor hidden = causal_mask(scores.size(-2), scores.size(-1), q_offset, scores.device()).logical_not();
  const at::Tensor x = scores.mul(scale).masked_fill(hidden, -std::numeric_limits<float>::infinity());
  return at::softmax(x, -1, at::kFloat).to(scores.scalar_type());
}

at::Tensor causal_softmax(const at::Tensor& scores, double scale, int64_t q_offset) {
  ANDY_CHECK(scores.dim() >= 2 && q_offset >= 0 && q_offset + scores.size(-2) <= scores.size(-1),
             "causal_softmax: scores [..., T, S] with queries at q_offset + T <= S expected, got ", scores.sizes(),
             " and q_offset ", q_offset);
  if (fused_ops_apply(scores) && scores.numel() > 0) return CausalSoftmaxFn::apply(scores, scale, q_offset);
  return causal_softmax_unfused(scores, scale, q_offset);
}

bool causal_attention_cpu_applies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  auto fp32_cpu = [](const at::Tensor& x) { return x.is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4; };
  return fused_kernels_enabled() && cpu_gemm_enabled() && !compat::autocast_enabled(at::kCPU) && fp32_cpu(q) &&
         fp32_cpu(k) && fp32_cpu(v) && k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(1) == k.size(1) &&
         q.size(3) == k.size(3) && k.size(2) > 0 && q.size(2) % k.size(2) == 0 && q.numel() > 0;
}

at::Tensor causal_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  ANDY_CHECK(causal_attention_cpu_applies(q, k, v), "causal_attention_cpu: q ", q.sizes(), " k ", k.sizes(), " v ",
             v.sizes(), " (CPU fp32 [B, T, H, d] and [B, T, H_kv, d] expected, fused kernels and oneDNN's sgemm on)");
  return CausalAttentionFn::apply(q.contiguous(), k.contiguous(), v.contiguous());
}

int kernel_threads() {
  const int64_t n = 4 * static_cast<int64_t>(at::get_num_threads());
  std::vector<char> used(static_cast<size_t>(at::get_num_threads()), 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(used.size())) used[static_cast<size_t>(t)] = 1;
  });
  int count = 0;
  for (char u : used) count += u;
  return count;
}

double sum_of_squares_unfused(const at::Tensor& g) { return g.to(at::kDouble).pow(2).sum().item<double>(); }

double sum_of_squares(const at::Tensor& g) {
  if (!(fused_kernels_enabled() && g.is_cpu() && g.scalar_type() == at::kFloat && g.is_contiguous()))
    return sum_of_squares_unfused(g);
  constexpr int64_t kChunk = 1 << 16;
  const int64_t n = g.numel(), chunks = (n + kChunk - 1) / kChunk;
  const float* x = g.data_ptr<float>();
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c)
      partial[static_cast<size_t>(c)] = sum_sq_chunk(x + c * kChunk, std::min(kChunk, n - c * kChunk));
  });
  double s = 0;
  for (double p : partial) s += p;
  return s;
}

}  // namespace andy
