// Dynamic int8 linear (see int8_linear.h): per-token activation quantization and an int8 x int8
// -> int32 kernel, AVX2 where available.
#include "parallel/int8_linear.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

#include "core/base/error.h"

namespace andy {

namespace {

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// Dot products of one weight row with `rows` (1..4) activation rows, K a multiple of 32.
__attribute__((target("avx2,fma"))) void dots_avx2(const int8_t* w, const int8_t* const* x, int rows, int64_t k,
                                                   int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                    _mm256_setzero_si256()};
  for (int64_t i = 0; i < k; i += 32) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i));
    for (int r = 0; r < rows; ++r) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[r] + i));
      // |x| (unsigned) times w with x's sign: pairs summed to int16 without saturation, since
      // |x|, |w| <= 127 give at most 2 * 127 * 127 = 32258.
      const __m256i prod = _mm256_maddubs_epi16(_mm256_abs_epi8(xv), _mm256_sign_epi8(wv, xv));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(prod, ones));
    }
  }
  for (int r = 0; r < rows; ++r) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc[r]), _mm256_extracti128_si256(acc[r], 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    out[r] = _mm_cvtsi128_si32(s);
  }
}

int32_t dot_portable(const int8_t* w, const int8_t* x, int64_t from, int64_t k) {
  int32_t s = 0;
  for (int64_t i = from; i < k; ++i) s += static_cast<int32_t>(w[i]) * static_cast<int32_t>(x[i]);
  return s;
}

// y[m, n] for n in [n0, n1): every weight row is read once and used for all M rows.
void int8_rows(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws, float* y, int64_t m_rows,
               int64_t n0, int64_t n1, int64_t n_cols, int64_t k) {
  const bool avx2 = has_avx2();
  const int64_t k_vec = avx2 ? k / 32 * 32 : 0;
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* w = wq + n * k;
    for (int64_t m = 0; m < m_rows; m += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, m_rows - m));
      const int8_t* x[4];
      int32_t dot[4] = {0, 0, 0, 0};
      for (int r = 0; r < rows; ++r) x[r] = xq + (m + r) * k;
      if (k_vec > 0) dots_avx2(w, x, rows, k_vec, dot);
      for (int r = 0; r < rows; ++r) {
        dot[r] += dot_portable(w, x[r], k_vec, k);
        y[(m + r) * n_cols + n] = static_cast<float>(dot[r]) * xs[m + r] * ws[n];
      }
    }
  }
}

}  // namespace

std::pair<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x) {
  ANDY_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "quantize_rows_int8: fp32 [M, K] expected");
  at::Tensor xc = x.contiguous();
  const int64_t m_rows = xc.size(0), k = xc.size(1);
  at::Tensor q = at::empty({m_rows, k}, at::kChar);
  at::Tensor s = at::empty({m_rows}, at::kFloat);
  const float* xp = xc.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = s.data_ptr<float>();
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* row = xp + m * k;
    float amax = 0.0f;
    for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(row[i]));
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    const float inv = 1.0f / scale;
    for (int64_t i = 0; i < k; ++i)
      qp[m * k + i] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(row[i] * inv))));
    sp[m] = scale;
  }
  return {q, s};
}

Int8Linear::Int8Linear(const at::Tensor& q, const at::Tensor& scale) {
  ANDY_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "Int8Linear: int8 [out, in] weight expected, got ",
             q.scalar_type(), " ", q.sizes());
  ANDY_CHECK(scale.dim() == 1 && scale.size(0) == q.size(0), "Int8Linear: one scale per output row expected, got ",
             scale.sizes(), " for weight ", q.sizes());
  q_ = q.to(at::kCPU).contiguous();
  scale_ = scale.to(at::kCPU, at::kFloat).contiguous();
}

at::Tensor Int8Linear::forward(const at::Tensor& x) const {
  const int64_t k = in_features(), n_cols = out_features();
  ANDY_CHECK(x.size(-1) == k, "Int8Linear: input has ", x.size(-1), " features, the weight ", k);
  ANDY_CHECK(x.device().is_cpu(), "Int8Linear: int8 models run on CPU only");
  auto shape = x.sizes().vec();
  const auto [xq, xs] = quantize_rows_int8(x.reshape({-1, k}).to(at::kFloat));
  const int64_t m_rows = xq.size(0);
  at::Tensor y = at::empty({m_rows, n_cols}, at::kFloat);
  const int8_t* xqp = xq.data_ptr<int8_t>();
  const float* xsp = xs.data_ptr<float>();
  const int8_t* wq = q_.data_ptr<int8_t>();
  const float* ws = scale_.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Grain: enough rows that a task reads ~64 KiB of weights.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1));
  at::parallel_for(0, n_cols, grain, [&](int64_t n0, int64_t n1) {
    int8_rows(xqp, xsp, wq, ws, yp, m_rows, n0, n1, n_cols, k);
  });
  shape.back() = n_cols;
  return y.view(shape);
}

}  // namespace andy
