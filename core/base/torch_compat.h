// The one place where LibTorch version differences live (Debian's 1.13 CPU build and
// PyTorch 2.x with CUDA). Everything else calls these helpers instead of testing versions.
#pragma once

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/version.h>

#include <set>
#include <string>
#include <vector>

#if defined(ANDYLLM_TORCH_CUDA)
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#define ANDYLLM_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

#if ANDYLLM_TORCH_AT_LEAST(2, 1)
#include <torch/csrc/autograd/profiler_kineto.h>
#endif

namespace andy::compat {

// True where at::scaled_dot_product_attention exists (2.0+): fused / flash attention on GPU.
constexpr bool kHasFusedSdpa = ANDYLLM_TORCH_AT_LEAST(2, 0);

// at::scaled_dot_product_attention (2.0+: flash / memory-efficient kernels on GPU). Only
// called where kHasFusedSdpa; on 1.13 the caller uses its explicit attention instead.
inline at::Tensor fused_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const c10::optional<at::Tensor>& mask, bool is_causal) {
#if ANDYLLM_TORCH_AT_LEAST(2, 0)
  return at::scaled_dot_product_attention(q, k, v, mask, 0.0, is_causal);
#else
  (void)q; (void)k; (void)v; (void)mask; (void)is_causal;
  TORCH_CHECK(false, "fused_sdpa needs LibTorch 2.0 or newer");
#endif
}

// at::rms_norm (2.4+; in recent releases a fused kernel with its own backward on CUDA).
constexpr bool kHasNativeRmsNorm = ANDYLLM_TORCH_AT_LEAST(2, 4);

// Runs outside autocast (whose fp32 list may hold rms_norm): the output has x's dtype.
inline at::Tensor native_rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
#if ANDYLLM_TORCH_AT_LEAST(2, 4)
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return at::rms_norm(x, {x.size(-1)}, weight, eps);
#else
  (void)x; (void)weight; (void)eps;
  TORCH_CHECK(false, "native_rms_norm needs LibTorch 2.4 or newer");
#endif
}

// at::_fused_adamw_ (2.1+): one multi-tensor AdamW kernel over lists of parameters (CUDA; CPU
// too in newer releases). Decoupled weight decay, bias corrections from the step count:
//   p -= lr*wd*p; m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
// with g = grad / grad_divisor where grad_divisor is given (a one-element float tensor on the
// parameters' device); `step` likewise a one-element float tensor holding the step count.
constexpr bool kHasFusedAdamw = ANDYLLM_TORCH_AT_LEAST(2, 1);

inline void fused_adamw(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                        const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                        const at::Tensor& step, double lr, double beta1, double beta2, double weight_decay,
                        double eps, const c10::optional<at::Tensor>& grad_divisor) {
#if ANDYLLM_TORCH_AT_LEAST(2, 1)
  const std::vector<at::Tensor> steps(params.size(), step);
  at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                    weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false, grad_divisor, /*found_inf=*/{});
#else
  (void)params; (void)grads; (void)exp_avgs; (void)exp_avg_sqs; (void)step; (void)lr; (void)beta1;
  (void)beta2; (void)weight_decay; (void)eps; (void)grad_divisor;
  TORCH_CHECK(false, "fused_adamw needs LibTorch 2.1 or newer");
#endif
}

// LibTorch's (Kineto) profiler: CPU ops and, with `cuda`, the GPU kernels, written as a Chrome
// trace (chrome://tracing, Perfetto). 2.1+ only.
constexpr bool kHasKinetoProfiler = ANDYLLM_TORCH_AT_LEAST(2, 1);

inline void profiler_start(bool cuda) {
#if ANDYLLM_TORCH_AT_LEAST(2, 1)
  namespace pi = torch::profiler::impl;
  std::set<pi::ActivityType> activities{pi::ActivityType::CPU};
  if (cuda) activities.insert(pi::ActivityType::CUDA);
  torch::autograd::profiler::prepareProfiler(pi::ProfilerConfig(pi::ProfilerState::KINETO), activities);
  torch::autograd::profiler::enableProfiler(pi::ProfilerConfig(pi::ProfilerState::KINETO), activities);
#else
  (void)cuda;
  TORCH_CHECK(false, "the trace profiler needs LibTorch 2.1 or newer");
#endif
}

inline void profiler_stop(const std::string& trace_path) {
#if ANDYLLM_TORCH_AT_LEAST(2, 1)
  torch::autograd::profiler::disableProfiler()->save(trace_path);
#else
  (void)trace_path;
  TORCH_CHECK(false, "the trace profiler needs LibTorch 2.1 or newer");
#endif
}

// Whether this LibTorch was built with CUDA (and found a device at run time).
inline bool torch_has_cuda() {
#if defined(ANDYLLM_TORCH_CUDA)
  return true;
#else
  return false;
#endif
}

// CUDA devices this LibTorch can use (0 in a CPU-only build). c10::cuda::device_count() is
// stable across 1.x and 2.x, unlike the hooks interface.
inline int cuda_device_count() {
#if defined(ANDYLLM_TORCH_CUDA)
  return static_cast<int>(c10::cuda::device_count());
#else
  return 0;
#endif
}

// Free bytes on CUDA device `index` (cudaMemGetInfo); 0 in a CPU-only build.
inline int64_t cuda_free_memory(int index) {
#if defined(ANDYLLM_TORCH_CUDA)
  size_t free_b = 0, total_b = 0;
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return 0;
  return static_cast<int64_t>(free_b);
#else
  (void)index;
  return 0;
#endif
}

// Waits for every kernel queued on CUDA device `index` (nothing in a CPU-only build).
inline void cuda_synchronize(int index) {
#if defined(ANDYLLM_TORCH_CUDA)
  c10::cuda::set_device(static_cast<c10::DeviceIndex>(index));
  c10::cuda::device_synchronize();
#else
  (void)index;
#endif
}

// Whether autocast is on for a device type.
inline bool autocast_enabled(at::DeviceType device) {
#if ANDYLLM_TORCH_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(device);
#else
  return device == at::kCPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
}

// Enables or disables autocast for a device type with the given lower-precision dtype.
inline void set_autocast(at::DeviceType device, bool enabled, at::ScalarType dtype) {
#if ANDYLLM_TORCH_AT_LEAST(2, 4)
  at::autocast::set_autocast_enabled(device, enabled);
  at::autocast::set_autocast_dtype(device, dtype);
#else
  if (device == at::kCPU) {
    at::autocast::set_cpu_enabled(enabled);
    at::autocast::set_autocast_cpu_dtype(dtype);
  } else {
    at::autocast::set_enabled(enabled);
    at::autocast::set_autocast_gpu_dtype(dtype);
  }
#endif
}

#if defined(ANDYLLM_TORCH_CUDA)
// The stream LibTorch is issuing work on for `device_index` (what NCCL must order against).
inline cudaStream_t current_cuda_stream(int device_index) {
  return c10::cuda::getCurrentCUDAStream(device_index).stream();
}
// A high-priority stream from LibTorch's pool for `device_index`: lives as long as the process.
inline cudaStream_t pool_cuda_stream(int device_index) {
  return c10::cuda::getStreamFromPool(/*isHighPriority=*/true, static_cast<c10::DeviceIndex>(device_index)).stream();
}
// Tells the caching allocator that `t` is in use on `stream` (so it is not reused early).
inline void record_stream(const at::Tensor& t, cudaStream_t stream) {
  c10::cuda::CUDACachingAllocator::recordStream(
      t.storage().data_ptr(), c10::cuda::getStreamFromExternal(stream, t.device().index()));
}
#endif

}  // namespace andy::compat
