// Dynamic int8 linear for CPU inference: weights int8 with one fp32 scale per output row
// (symmetric: w ~= q * scale[row], q in [-127, 127]), activations quantized per call by
// LibTorch's quantized::linear_dynamic on the oneDNN engine (Debian's LibTorch has oneDNN and
// QNNPACK, not FBGEMM; oneDNN measured 1.7x faster than fp32 at one row and 2.6x at 32 rows on
// a [1536, 512] weight, QNNPACK slower than fp32). The weight is prepacked once, at load.
// Both operators are reached through the dispatcher by name, so no quantized-kernel headers
// are needed. CPU only; inference only (no autograd).
// Thread-safety: forward may run on one thread at a time (the engine thread).
//
//   Int8Linear lin(q, scale);          // q int8 [out, in], scale fp32 [out]
//   at::Tensor y = lin.forward(x);     // x fp32 [..., in] -> [..., out]
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>

namespace andy {

class Int8Linear {
 public:
  // Rows whose scale is 0 (all-zero rows, e.g. vocabulary padding) get scale 1.
  Int8Linear(const at::Tensor& q, const at::Tensor& scale);
  at::Tensor forward(const at::Tensor& x) const;
  int64_t out_features() const { return out_; }
  int64_t in_features() const { return in_; }

 private:
  c10::IValue packed_;  // LinearPackedParamsBase from quantized::linear_prepack
  int64_t out_ = 0, in_ = 0;
};

}  // namespace andy
