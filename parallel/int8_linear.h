// Dynamic int8 linear for CPU inference: weights int8 with one fp32 scale per output row
// (symmetric: w ~= q * scale[row], q in [-127, 127]); each input row quantized at run time the
// same way (x ~= qx * sx, one scale per token), products summed exactly in int32:
//   y[m, n] = (sum_k qx[m, k] * q[n, k]) * sx[m] * scale[n]
// Per-token activation scales make a row's output independent of the other rows in the batch
// (a sequence gets the same tokens alone or batched), and integer sums make the AVX2 kernel
// and the portable one give identical results.
//
// Why our own kernel: LibTorch 1.13's quantized::linear_dynamic on the oneDNN engine (Debian's
// LibTorch has oneDNN and QNNPACK, not FBGEMM) keys its primitive on the activation scale, so
// every decode step re-JITs its kernels (mmap/mprotect in the profile): the 25 M model decoded
// at 65 tok/s against 90 for fp32. QNNPACK is slower than fp32 on x86. This kernel reads the
// int8 weights once per call (rows blocked so a weight row is reused across 4 tokens in
// registers), with AVX2 where the CPU has it (vpsignb/vpabsb/vpmaddubsw/vpmaddwd, as
// llama.cpp's q8_0 dot product) and a portable loop otherwise. Inference only (no autograd);
// output rows are split over LibTorch's intra-op threads.
// Thread-safety: forward is const and may run on several threads.
//
//   Int8Linear lin(q, scale);          // q int8 [out, in], scale fp32 [out]
//   at::Tensor y = lin.forward(x);     // x fp32 [..., in] -> [..., out] fp32
#pragma once

#include <ATen/ATen.h>

namespace andy {

class Int8Linear {
 public:
  Int8Linear(const at::Tensor& q, const at::Tensor& scale);
  at::Tensor forward(const at::Tensor& x) const;
  int64_t out_features() const { return q_.size(0); }
  int64_t in_features() const { return q_.size(1); }

 private:
  at::Tensor q_;      // int8 [out, in], contiguous
  at::Tensor scale_;  // fp32 [out]
};

// x fp32 [M, K] -> (int8 [M, K], fp32 scale [M]): per-row symmetric quantization (scale 1 for
// an all-zero row). Exposed for tests.
std::pair<at::Tensor, at::Tensor> quantize_rows_int8(const at::Tensor& x);

}  // namespace andy
