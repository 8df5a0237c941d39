// A CPU kernel for the decode half of paged attention: each sequence's one new query attends
// to its cached keys and values read in place from the paged cache (no gather into a padded
// copy), one pass over K and one over V per kv head, shared by the query heads of its group.
// The cache is in the block layouts of core/model/kv_cache.h (keys transposed per head) and may
// hold fp32, bf16 or fp16 (serve.kv_cache_dtype), read as fp32; queries, scores and outputs are
// fp32. AVX-512 (F, BW, VL), else AVX2 + FMA + F16C, where the CPU has them (checked at run
// time), portable loops otherwise. Parallel over (sequence, kv head) with LibTorch's intra-op
// threads.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace andy {

struct DecodeAttentionArgs {
  const float* q = nullptr;        // [N, H, d] packed queries (rows of the batch)
  const void* k_cache = nullptr;   // [blocks, H_kv, d, block_size] of kv_dtype
  const void* v_cache = nullptr;   // [blocks, H_kv, block_size, d]
  c10::ScalarType kv_dtype = c10::kFloat;
  float* out = nullptr;            // [N, H, d]
  int64_t n_head = 0, n_kv_head = 0, head_dim = 0, block_size = 0;
  float scale = 1.0f;              // 1/sqrt(head_dim); must be positive
  // Per decoded sequence: its row in q/out, its context length and block table.
  std::vector<int64_t> rows, context_len;
  std::vector<const std::vector<int64_t>*> tables;
};

// Whether the kernel reads a cache of this dtype (fp32, bf16, fp16).
bool decode_attention_cpu_supports(c10::ScalarType kv_dtype);

void decode_attention_cpu(const DecodeAttentionArgs& a);

// The instruction set the kernel uses: the widest the CPU has, at most the limit (tests lower
// it to check every path on one machine; the results agree to rounding, not bit for bit).
enum class CpuIsa : int { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };
CpuIsa decode_attention_cpu_isa();
void decode_attention_cpu_limit_isa(CpuIsa isa);
// Every instruction set this CPU can run the kernel with, widest first, and their names
// ("avx512", "avx2", "portable").
std::vector<CpuIsa> decode_attention_cpu_isas();
const char* cpu_isa_name(CpuIsa isa);

}  // namespace andy
