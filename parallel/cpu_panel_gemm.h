// fp32 products of few rows (decode steps) against weights packed in column panels, with
// AVX-512: y[M, N] = x[M, K] W^T for W [N, K].
//
// The weights are packed once into panels of 32 output columns, each panel K rows of 32 floats
// (two AVX-512 vectors; the last panel zero-padded), one contiguous run after another. A panel's
// rows are read once for up to 12 rows of x, whose sums stay in 24 registers; while a panel is
// computed the next one is prefetched, so that the weights stream from memory during the
// arithmetic: 1.0-2.4x oneDNN's packed sgemm (cpu_gemm.h) on weights that are not in the cache,
// as in every decode step (docs/PERFORMANCE.md).
//
// Each output element is one fp32 sum over k in order (fused multiply-adds), the same whatever the
// number of rows: a row's result does not depend on the other rows of the product.
#pragma once

#include <cstdint>

namespace andy {

// Whether this CPU runs the kernel (AVX-512 F).
bool panel_gemm_available();

// Floats of W's packed layout: ceil(N / 32) panels of K x 32.
int64_t panel_gemm_packed_size(int64_t n, int64_t k);

// Packs W [N, K] (row-major, leading dimension K) into `packed` (panel_gemm_packed_size floats,
// 64-byte aligned).
void panel_gemm_pack(const float* w, int64_t n, int64_t k, float* packed);

// y [M, N] (leading dimension ldy) = x [M, K] (leading dimension lda) times the packed W
// transposed. Panels are split over the intra-op threads where there is enough work.
// Requires panel_gemm_available().
void panel_gemm(const float* x, int64_t m, int64_t k, int64_t lda, const float* packed, int64_t n, float* y,
                int64_t ldy);

}  // namespace andy
