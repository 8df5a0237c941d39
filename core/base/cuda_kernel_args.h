// Tensors to the arguments of core/base/cuda_kernels.h. ANDYLLM_CUDA_KERNELS is 1 where LibTorch
// has CUDA and the kernels were built (the toolkit's nvcc works here); callers put their CUDA paths
// under `#if ANDYLLM_CUDA_KERNELS` and keep the LibTorch composites otherwise.
#pragma once

#include <ATen/ATen.h>

#include "core/base/avx2_math.h"
#include "core/base/cuda_kernels.h"
#include "core/base/torch_compat.h"

#if defined(ANDYLLM_TORCH_CUDA) && defined(ANDYLLM_HAVE_CUDA_KERNELS)
#define ANDYLLM_CUDA_KERNELS 1
#else
#define ANDYLLM_CUDA_KERNELS 0
#endif

namespace andy {

// Whether our CUDA kernels take tensors like `x`: a CUDA tensor of fp32, bf16 or fp16 in a build
// with the kernels, ANDYLLM_FUSED_OPS not 0.
inline bool cuda_kernels_apply(const at::Tensor& x) {
  return ANDYLLM_CUDA_KERNELS && fused_ops_requested() && x.is_cuda() &&
         (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf);
}

inline cuda::DType cuda_dtype(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return cuda::DType::kF32;
    case at::kBFloat16: return cuda::DType::kBF16;
    case at::kHalf: return cuda::DType::kF16;
    default: TORCH_CHECK(false, "CUDA kernels: fp32, bf16 or fp16 expected, got ", x.scalar_type());
  }
}

// The stream LibTorch issues work on for x's device (a cudaStream_t).
inline void* cuda_stream_for(const at::Tensor& x) {
#if defined(ANDYLLM_TORCH_CUDA)
  return compat::current_cuda_stream(x.device().index());
#else
  (void)x;
  return nullptr;
#endif
}

}  // namespace andy
