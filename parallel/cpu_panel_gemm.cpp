// fp32 panel GEMM for few rows (see cpu_panel_gemm.h).
#include "parallel/cpu_panel_gemm.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

// GCC 12's AVX-512 intrinsics build their "undefined" vectors by self-initialization, which
// -Wmaybe-uninitialized reports at every inlined use (a false positive; GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace andy {

namespace {

constexpr int64_t kPanel = 32;  // output columns per panel: two AVX-512 vectors
constexpr int kMaxRows = 12;    // rows of x per pass: 24 accumulators, 2 weight vectors, 1 broadcast

#define ANDY_AVX512F __attribute__((target("avx512f")))

// MR rows of x against one panel (cols <= 32 valid columns), summed over k in order. While it
// runs, the rows kk = first_pf, first_pf + pf_step, ... of the next panel (when there is one) are
// prefetched, so that the passes over one panel together fetch all of the next.
template <int MR>
ANDY_AVX512F void panel_rows(const float* x, int64_t lda, const float* panel, int64_t k, float* y, int64_t ldy,
                             int64_t cols, const float* next, int64_t first_pf, int64_t pf_step) {
  __m512 acc0[MR], acc1[MR];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
  int64_t pf = next ? first_pf : k;
  for (int64_t kk = 0; kk < k; ++kk) {
    const float* b = panel + kk * kPanel;
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
    if (kk == pf) {
      _mm_prefetch(reinterpret_cast<const char*>(next + kk * kPanel), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(next + kk * kPanel + 16), _MM_HINT_T1);
      pf += pf_step;
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * lda + kk]);
      acc0[r] = _mm512_fmadd_ps(a, b0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(a, b1, acc1[r]);
    }
  }
  if (cols == kPanel) {
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      _mm512_storeu_ps(y + r * ldy, acc0[r]);
      _mm512_storeu_ps(y + r * ldy + 16, acc1[r]);
    }
  } else {
    const __mmask16 m0 = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
    const __mmask16 m1 = cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1);
    for (int r = 0; r < MR; ++r) {
      _mm512_mask_storeu_ps(y + r * ldy, m0, acc0[r]);
      _mm512_mask_storeu_ps(y + r * ldy + 16, m1, acc1[r]);
    }
  }
}

using PanelRows = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, const float*,
                           int64_t, int64_t);

constexpr PanelRows kByRows[kMaxRows + 1] = {nullptr,        panel_rows<1>,  panel_rows<2>,  panel_rows<3>,
                                             panel_rows<4>,  panel_rows<5>,  panel_rows<6>,  panel_rows<7>,
                                             panel_rows<8>,  panel_rows<9>,  panel_rows<10>, panel_rows<11>,
                                             panel_rows<12>};

}  // namespace

bool panel_gemm_available() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

int64_t panel_gemm_packed_size(int64_t n, int64_t k) { return (n + kPanel - 1) / kPanel * kPanel * k; }

void panel_gemm_pack(const float* w, int64_t n, int64_t k, float* packed) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  for (int64_t p = 0; p < panels; ++p) {
    float* dst = packed + p * kPanel * k;
    const int64_t cols = std::min(kPanel, n - p * kPanel);
    for (int64_t kk = 0; kk < k; ++kk) {
      for (int64_t c = 0; c < cols; ++c) dst[kk * kPanel + c] = w[(p * kPanel + c) * k + kk];
      for (int64_t c = cols; c < kPanel; ++c) dst[kk * kPanel + c] = 0.0f;
    }
  }
}

void panel_gemm(const float* x, int64_t m, int64_t k, int64_t lda, const float* packed, int64_t n, float* y,
                int64_t ldy) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t passes = (m + kMaxRows - 1) / kMaxRows;  // over each panel
  // Panels per thread at least: about 1 MFLOP of work, above at::parallel_for's cost.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, 2 * m * k * kPanel));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const float* panel = packed + p * kPanel * k;
      const float* next = p + 1 < end ? panel + kPanel * k : nullptr;
      const int64_t cols = std::min(kPanel, n - p * kPanel);
      for (int64_t pass = 0; pass < passes; ++pass) {
        const int64_t r0 = pass * kMaxRows, rows = std::min<int64_t>(kMaxRows, m - r0);
        kByRows[rows](x + r0 * lda, lda, panel, k, y + r0 * ldy + p * kPanel, ldy, cols, next, pass, passes);
      }
    }
  });
}

}  // namespace andy
