// CUDA kernels for the model's elementwise steps that LibTorch 2.x has no fused op for (issue
// 13): RoPE and SwiGLU with their backward, and the one-rank softmax cross-entropy (forward
// keeps only each row's log-sum-exp; backward writes the logits' gradient in their dtype, in one
// pass). Plain pointers and a stream: no LibTorch or CUDA header here, so the kernels compile
// with nvcc wherever the CUDA toolkit is found (CI included), and the autograd wrappers
// (core/model/fused_ops.cpp, parallel/tp_cross_entropy.cpp) use them where LibTorch has CUDA.
// Every function launches on `stream` (a cudaStream_t) and throws std::runtime_error naming the
// kernel when the launch fails. Arithmetic in fp32 whatever the storage type.
#pragma once

#include <cstdint>

namespace andy::cuda {

enum class DType { kF32, kBF16, kF16 };

// x, y [rows, heads, d] (rows = batch x time); cos, sin [rows, d] fp32; rotate-half convention:
// y[i] = x[i] cos[i] - x[i + d/2] sin[i], y[i + d/2] = x[i + d/2] cos[i + d/2] + x[i] sin[i + d/2].
void rope_forward(DType t, const void* x, const float* cos, const float* sin, void* y, int64_t rows,
                  int64_t heads, int64_t d, void* stream);
// dx from dy (the transpose of the rotation above).
void rope_backward(DType t, const void* dy, const float* cos, const float* sin, void* dx, int64_t rows,
                   int64_t heads, int64_t d, void* stream);

// out = silu(gate) * up over n elements; the backward gives dgate and dup.
void swiglu_forward(DType t, const void* gate, const void* up, void* out, int64_t n, void* stream);
void swiglu_backward(DType t, const void* dout, const void* gate, const void* up, void* dgate, void* dup, int64_t n,
                     void* stream);

// logits [rows, vocab] (contiguous), targets [rows] int64. loss[r] = lse[r] - logits[r, t] (0 where
// t == ignore_index; a target outside [0, vocab) contributes no logit), lse[r] = log sum exp row.
void cross_entropy_forward(DType t, const void* logits, const int64_t* targets, int64_t rows, int64_t vocab,
                           int64_t ignore_index, float* loss, float* lse, void* stream);
// dlogits[r, j] = (exp(logits[r, j] - lse[r]) - [j == t]) * dloss[r]; 0 on ignored rows.
void cross_entropy_backward(DType t, const void* logits, const int64_t* targets, const float* lse, const float* dloss,
                            int64_t rows, int64_t vocab, int64_t ignore_index, void* dlogits, void* stream);

}  // namespace andy::cuda
