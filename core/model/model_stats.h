// Size, cost and memory of a LLaMA configuration, from the config alone (no model built).
//   parameters: real (unpadded) counts, the tied embedding counted once.
//   training FLOPs per token: llm.c's / PaLM's MFU accounting, 6 N + 12 L H Q T, with N the
//     parameters that take part in matmuls (all but an untied embedding table, whose lookup
//     costs nothing; with tied embeddings the shared matrix is the output head and counts),
//     L layers, H query heads, Q head size, T the sequence length (attention counted as if
//     not causal, as llm.c and Megatron-LM do).
//   memory: bytes per rank for fp32 master weights, fp32 gradients, AdamW (two fp32 moments)
//     and the activations our explicit (non-fused) implementation keeps for backward.
#pragma once

#include <cstdint>
#include <string>

#include "core/config/config.h"

namespace andy {

struct ParamCounts {
  int64_t embedding = 0;  // model.embed_tokens
  int64_t lm_head = 0;    // 0 when tied
  int64_t per_layer = 0;  // one decoder block (norms included)
  int64_t final_norm = 0;
  int64_t total = 0;
  int64_t non_embedding() const { return total - embedding - lm_head; }
};
ParamCounts count_parameters(const ModelConfig& m);

double training_flops_per_token(const ModelConfig& m, int64_t seq_len);

// Dense (no sparsity) peak TFLOP/s of one GPU for MFU, from its CUDA device name, for the
// matmul precision that `precision_mode` (fp32 | bf16 | fp16) runs at: bf16/fp16 tensor cores,
// or plain fp32 (LibTorch leaves TF32 matmul off by default). 0 for a GPU not in the table:
// MFU is then shown as unknown rather than wrong (train.peak_tflops overrides).
double known_gpu_peak_tflops(const std::string& device_name, const std::string& precision_mode);

struct MemoryEstimate {
  double weights = 0, gradients = 0, optimizer = 0, activations = 0;  // bytes per rank
  double total() const { return weights + gradients + optimizer + activations; }
};
// One micro-batch of `batch` sequences of `seq_len` tokens on a rank holding 1/tp of the
// sharded weights. precision: "fp32" keeps activations in 4 bytes, "bf16"/"fp16" in 2.
MemoryEstimate estimate_memory(const ModelConfig& m, int tp_size, int64_t batch, int64_t seq_len,
                               const std::string& precision);

// Lines for `andyllm train --print-config` (TOML comments): parameters, FLOPs per token and
// the memory estimate for [train] batch_size x [data] seq_len at the configured TP size.
std::string model_summary(const Config& cfg);

}  // namespace andy
