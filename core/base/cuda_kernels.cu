// CUDA kernels (see cuda_kernels.h). Grid-stride kernels with 16-byte loads for RoPE (row blocks
// where the shape allows no vectors) and SwiGLU; one block per row for the cross-entropy, with an
// online (max, sum of exp) per thread combined across the block.
#include "core/base/cuda_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace andy::cuda {
namespace {

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half(v); }

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA kernel ") + what + ": " + cudaGetErrorString(e));
}

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 16 ? (blocks > 0 ? blocks : 1) : 65535 * 16);
}

// Calls f with a typed null pointer of the storage type: f(static_cast<T*>(nullptr)).
template <typename F>
void on_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF32: f(static_cast<float*>(nullptr)); break;
    case DType::kBF16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    case DType::kF16: f(static_cast<__half*>(nullptr)); break;
  }
}

// 16-byte vectors (8 bf16 / fp16 or 4 fp32 elements per load) where n and the pointers allow.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- RoPE --------------------------------------------------------------------------------
// Element i of a head and its partner i + d/2 (a, b) to the output pair (*ya, *yb); backward: a, b
// are dy[i], dy[i + d/2] and the rotation is transposed.
__device__ __forceinline__ void rope_rotate(float a, float b, float c1, float s1, float c2, float s2, bool backward,
                                            float* ya, float* yb) {
  if (!backward) {
    *ya = a * c1 - b * s1;
    *yb = b * c2 + a * s2;
  } else {
    *ya = a * c1 + b * s2;
    *yb = b * c2 - a * s1;
  }
}

// The scalar kernel: blocks of (32, 8) threads over rows, threadIdx.x walking i < d/2, threadIdx.y
// the heads. The vector kernel below takes head dims whose half is a whole number of 16-byte
// vectors (the usual 64 and 128 in every dtype): 2-byte loads reached about a third of an H100's
// bandwidth (2.1 ms of a step for 0.7 ms of traffic).
constexpr int kRopeX = 32, kRopeY = 8;

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                            T* __restrict__ y, int64_t rows, int heads, int d, bool backward) {
  const int half = d / 2;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* cr = cos + row * d;
    const float* sr = sin + row * d;
    for (int i = threadIdx.x; i < half; i += kRopeX) {
      const float c1 = cr[i], s1 = sr[i], c2 = cr[i + half], s2 = sr[i + half];
      for (int h = threadIdx.y; h < heads; h += kRopeY) {
        const int64_t xo = (row * heads + h) * d + i;
        float ya, yb;
        rope_rotate(load(x, xo), load(x, xo + half), c1, s1, c2, s2, backward, &ya, &yb);
        store(y, xo, ya);
        store(y, xo + half, yb);
      }
    }
  }
}

// One thread per kVec<T> consecutive elements i0.. of a head's first half and their partners in
// the second: two 16-byte loads and stores of x / y, cos and sin rows in 16-byte loads too.
// Needs (d/2) % kVec<T> == 0, 16-byte aligned pointers and rows * heads * d / 2 / kVec < 2^31.
template <typename T>
__global__ void rope_vec_kernel(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                                T* __restrict__ y, uint32_t total, int per_row, int nv, int heads, int d,
                                bool backward) {
  constexpr int V = kVec<T>;
  const int half = d / 2;
  for (uint32_t idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += gridDim.x * blockDim.x) {
    const uint32_t row = idx / per_row;
    const int j = static_cast<int>(idx - row * per_row), h = j / nv, i0 = (j - h * nv) * V;
    const int64_t xo = (static_cast<int64_t>(row) * heads + h) * d + i0, co = static_cast<int64_t>(row) * d + i0;
    float c1[V], s1[V], c2[V], s2[V];
#pragma unroll
    for (int q = 0; q < V / 4; ++q) {
      reinterpret_cast<float4*>(c1)[q] = reinterpret_cast<const float4*>(cos + co)[q];
      reinterpret_cast<float4*>(s1)[q] = reinterpret_cast<const float4*>(sin + co)[q];
      reinterpret_cast<float4*>(c2)[q] = reinterpret_cast<const float4*>(cos + co + half)[q];
      reinterpret_cast<float4*>(s2)[q] = reinterpret_cast<const float4*>(sin + co + half)[q];
    }
    const uint4 ar = *reinterpret_cast<const uint4*>(x + xo), br = *reinterpret_cast<const uint4*>(x + xo + half);
    const T *av = reinterpret_cast<const T*>(&ar), *bv = reinterpret_cast<const T*>(&br);
    uint4 oa, ob;
    T *ov = reinterpret_cast<T*>(&oa), *pv = reinterpret_cast<T*>(&ob);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      float ya, yb;
      rope_rotate(load(av, k), load(bv, k), c1[k], s1[k], c2[k], s2[k], backward, &ya, &yb);
      store(ov, k, ya);
      store(pv, k, yb);
    }
    *reinterpret_cast<uint4*>(y + xo) = oa;
    *reinterpret_cast<uint4*>(y + xo + half) = ob;
  }
}

// ---- SwiGLU ------------------------------------------------------------------------------
// silu(g) * u, and its gradients for an upstream d: du = d silu(g), dg = d u sig (1 + g (1 - sig)).
__device__ __forceinline__ float swiglu_value(float g, float u) { return g / (1.0f + __expf(-g)) * u; }
__device__ __forceinline__ void swiglu_grads(float d, float g, float u, float* dg, float* du) {
  const float sig = 1.0f / (1.0f + __expf(-g));
  *du = d * g * sig;
  *dg = d * u * sig * (1.0f + g * (1.0f - sig));
}

template <typename T>
__global__ void swiglu_fwd_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    store(out, i, swiglu_value(load(g, i), load(u, i)));
  }
}

template <typename T>
__global__ void swiglu_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ g, const T* __restrict__ u,
                                  T* __restrict__ dg, T* __restrict__ du, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float dgv, duv;
    swiglu_grads(load(dout, i), load(g, i), load(u, i), &dgv, &duv);
    store(dg, i, dgv);
    store(du, i, duv);
  }
}

template <typename T>
__global__ void swiglu_fwd_vec_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ out,
                                      int64_t nvec) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 gr = reinterpret_cast<const uint4*>(g)[i], ur = reinterpret_cast<const uint4*>(u)[i];
    uint4 o;
    const T *gv = reinterpret_cast<const T*>(&gr), *uv = reinterpret_cast<const T*>(&ur);
    T* ov = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) {
      store(ov, k, swiglu_value(load(gv, k), load(uv, k)));
    }
    reinterpret_cast<uint4*>(out)[i] = o;
  }
}

template <typename T>
__global__ void swiglu_bwd_vec_kernel(const T* __restrict__ dout, const T* __restrict__ g, const T* __restrict__ u,
                                      T* __restrict__ dg, T* __restrict__ du, int64_t nvec) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < nvec;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 dr = reinterpret_cast<const uint4*>(dout)[i], gr = reinterpret_cast<const uint4*>(g)[i],
                ur = reinterpret_cast<const uint4*>(u)[i];
    uint4 go, uo;
    const T *dv = reinterpret_cast<const T*>(&dr), *gv = reinterpret_cast<const T*>(&gr),
            *uv = reinterpret_cast<const T*>(&ur);
    T *gov = reinterpret_cast<T*>(&go), *uov = reinterpret_cast<T*>(&uo);
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) {
      float dgx, dux;
      swiglu_grads(load(dv, k), load(gv, k), load(uv, k), &dgx, &dux);
      store(gov, k, dgx);
      store(uov, k, dux);
    }
    reinterpret_cast<uint4*>(dg)[i] = go;
    reinterpret_cast<uint4*>(du)[i] = uo;
  }
}

// ---- cross-entropy -----------------------------------------------------------------------
// (m, s) with s = sum exp(x - m); combining two keeps the larger max.
__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  if (m2 > m) {
    s = s * __expf(m - m2) + s2;  // m may be -inf: exp(-inf) = 0
    m = m2;
  } else if (m2 != -INFINITY) {
    s += s2 * __expf(m2 - m);
  }
}

// The row's elements in order, as f(j, x): 16-byte loads where VEC.
template <bool VEC, typename T, typename F>
__device__ __forceinline__ void for_row(const T* row, int64_t vocab, F&& f) {
  if constexpr (VEC) {
    const int64_t nvec = vocab / kVec<T>;
    for (int64_t jv = threadIdx.x; jv < nvec; jv += blockDim.x) {
      const uint4 r = reinterpret_cast<const uint4*>(row)[jv];
      const T* v = reinterpret_cast<const T*>(&r);
#pragma unroll
      for (int k = 0; k < kVec<T>; ++k) f(jv * kVec<T> + k, load(v, k));
    }
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) f(j, load(row, j));
  }
}

template <bool VEC, typename T>
__global__ void ce_fwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets, int64_t vocab,
                              int64_t ignore_index, float* __restrict__ loss, float* __restrict__ lse) {
  const int64_t r = blockIdx.x;
  const T* row = logits + r * vocab;
  float m = -INFINITY, s = 0.0f;
  for_row<VEC>(row, vocab, [&](int64_t, float x) {
    if (x > m) {
      s = s * __expf(m - x) + 1.0f;
      m = x;
    } else if (x != -INFINITY) {
      s += __expf(x - m);
    }
  });
  for (int off = 16; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    combine(m, s, m2, s2);
  }
  __shared__ float sm[32], ss[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = sm[0], bs = ss[0];
    for (int w = 1; w < warps; ++w) combine(bm, bs, sm[w], ss[w]);
    const float l = bm + logf(bs);
    lse[r] = l;
    const int64_t t = targets[r];
    loss[r] = t == ignore_index ? 0.0f : l - ((t >= 0 && t < vocab) ? load(row, t) : 0.0f);
  }
}

template <bool VEC, typename T>
__global__ void ce_bwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                              const float* __restrict__ lse, const float* __restrict__ dloss, int64_t vocab,
                              int64_t ignore_index, T* __restrict__ dlogits) {
  const int64_t r = blockIdx.x;
  const int64_t t = targets[r];
  const float scale = t == ignore_index ? 0.0f : dloss[r], l = lse[r];
  const T* row = logits + r * vocab;
  T* g = dlogits + r * vocab;
  if constexpr (VEC) {
    const int64_t nvec = vocab / kVec<T>;
    for (int64_t jv = threadIdx.x; jv < nvec; jv += blockDim.x) {
      const uint4 in = reinterpret_cast<const uint4*>(row)[jv];
      const T* v = reinterpret_cast<const T*>(&in);
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int k = 0; k < kVec<T>; ++k)
        store(o, k, (__expf(load(v, k) - l) - (jv * kVec<T> + k == t ? 1.0f : 0.0f)) * scale);
      reinterpret_cast<uint4*>(g)[jv] = out;
    }
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
      store(g, j, (__expf(load(row, j) - l) - (j == t ? 1.0f : 0.0f)) * scale);
  }
}

}  // namespace

namespace {
void launch_rope(DType t, const void* in, const float* cos, const float* sin, void* out, int64_t rows, int64_t heads,
                 int64_t d, void* stream, bool backward) {
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>(rows < 65535 * 16 ? rows : 65535 * 16);
  on_dtype(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = kVec<T>;
    const int64_t half = d / 2, total = rows * heads * (half / V);
    if (half % V == 0 && total < (int64_t{1} << 31) && aligned16(in) && aligned16(out) && aligned16(cos) &&
        aligned16(sin)) {
      const int nv = static_cast<int>(half / V);
      rope_vec_kernel<T><<<grid_for(total), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(in), cos, sin, static_cast<T*>(out), static_cast<uint32_t>(total),
          static_cast<int>(heads) * nv, nv, static_cast<int>(heads), static_cast<int>(d), backward);
      return;
    }
    rope_kernel<T><<<grid, dim3(kRopeX, kRopeY), 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(in), cos, sin, static_cast<T*>(out), rows, static_cast<int>(heads), static_cast<int>(d),
        backward);
  });
  check_launch(backward ? "rope_backward" : "rope_forward");
}
}  // namespace

void rope_forward(DType t, const void* x, const float* cos, const float* sin, void* y, int64_t rows, int64_t heads,
                  int64_t d, void* stream) {
  launch_rope(t, x, cos, sin, y, rows, heads, d, stream, false);
}

void rope_backward(DType t, const void* dy, const float* cos, const float* sin, void* dx, int64_t rows, int64_t heads,
                   int64_t d, void* stream) {
  launch_rope(t, dy, cos, sin, dx, rows, heads, d, stream, true);
}

void swiglu_forward(DType t, const void* gate, const void* up, void* out, int64_t n, void* stream) {
  on_dtype(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *g = static_cast<const T*>(gate), *u = static_cast<const T*>(up);
    T* o = static_cast<T*>(out);
    auto st = static_cast<cudaStream_t>(stream);
    if (n % kVec<T> == 0 && aligned16(g) && aligned16(u) && aligned16(o))
      swiglu_fwd_vec_kernel<T><<<grid_for(n / kVec<T>), kThreads, 0, st>>>(g, u, o, n / kVec<T>);
    else
      swiglu_fwd_kernel<T><<<grid_for(n), kThreads, 0, st>>>(g, u, o, n);
  });
  check_launch("swiglu_forward");
}

void swiglu_backward(DType t, const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                     void* stream) {
  on_dtype(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T *d = static_cast<const T*>(dout), *g = static_cast<const T*>(gate), *u = static_cast<const T*>(up);
    T *dg = static_cast<T*>(dgate), *du = static_cast<T*>(dup);
    auto st = static_cast<cudaStream_t>(stream);
    if (n % kVec<T> == 0 && aligned16(d) && aligned16(g) && aligned16(u) && aligned16(dg) && aligned16(du))
      swiglu_bwd_vec_kernel<T><<<grid_for(n / kVec<T>), kThreads, 0, st>>>(d, g, u, dg, du, n / kVec<T>);
    else
      swiglu_bwd_kernel<T><<<grid_for(n), kThreads, 0, st>>>(d, g, u, dg, du, n);
  });
  check_launch("swiglu_backward");
}

void cross_entropy_forward(DType t, const void* logits, const int64_t* targets, int64_t rows, int64_t vocab,
                           int64_t ignore_index, float* loss, float* lse, void* stream) {
  if (rows == 0) return;
  on_dtype(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* l = static_cast<const T*>(logits);
    auto st = static_cast<cudaStream_t>(stream);
    if (vocab % kVec<T> == 0 && aligned16(l))
      ce_fwd_kernel<true, T><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(l, targets, vocab, ignore_index, loss, lse);
    else
      ce_fwd_kernel<false, T><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(l, targets, vocab, ignore_index, loss, lse);
  });
  check_launch("cross_entropy_forward");
}

void cross_entropy_backward(DType t, const void* logits, const int64_t* targets, const float* lse, const float* dloss,
                            int64_t rows, int64_t vocab, int64_t ignore_index, void* dlogits, void* stream) {
  if (rows == 0) return;
  on_dtype(t, [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* l = static_cast<const T*>(logits);
    T* g = static_cast<T*>(dlogits);
    auto st = static_cast<cudaStream_t>(stream);
    if (vocab % kVec<T> == 0 && aligned16(l) && aligned16(g))
      ce_bwd_kernel<true, T><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(l, targets, lse, dloss, vocab, ignore_index, g);
    else
      ce_bwd_kernel<false, T><<<static_cast<unsigned>(rows), kThreads, 0, st>>>(l, targets, lse, dloss, vocab, ignore_index, g);
  });
  check_launch("cross_entropy_backward");
}

}  // namespace andy::cuda
