// CUDA_CHECK and NCCL_CHECK: throw CudaError / CommError naming file:line, the rank and the
// library's own error text. Only compiled where the CUDA toolkit (and NCCL) headers exist.
#pragma once

#include <cuda_runtime.h>

#include "core/base/error.h"

#define CUDA_CHECK(call)                                                                    \
  do {                                                                                      \
    cudaError_t andy_cuda_rc_ = (call);                                                     \
    if (andy_cuda_rc_ != cudaSuccess) {                                                     \
      throw ::andy::CudaError(::andy::where(__FILE__, __LINE__) + #call " failed: " +      \
                              cudaGetErrorString(andy_cuda_rc_) + " (" +                   \
                              cudaGetErrorName(andy_cuda_rc_) + ")");                      \
    }                                                                                       \
  } while (0)

#if defined(ANDYLLM_HAVE_NCCL)
#include <nccl.h>
#define NCCL_CHECK(call)                                                                    \
  do {                                                                                      \
    ncclResult_t andy_nccl_rc_ = (call);                                                    \
    if (andy_nccl_rc_ != ncclSuccess && andy_nccl_rc_ != ncclInProgress) {                  \
      throw ::andy::CommError(::andy::where(__FILE__, __LINE__) + #call " failed: " +      \
                              ncclGetErrorString(andy_nccl_rc_));                          \
    }                                                                                       \
  } while (0)
#endif
