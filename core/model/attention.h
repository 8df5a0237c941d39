// Attention and rotary position embeddings, with Hugging Face Llama numerics.
//
// RoPE layout: Hugging Face's "rotate_half" (LlamaRotaryEmbedding / apply_rotary_pos_emb):
// for head size d, inv_freq[i] = theta^(-2i/d), i < d/2; angle(p, i) = p * inv_freq[i];
// cos/sin tables are [max_seq_len, d] with the d/2 angles repeated twice (cat(freqs, freqs));
//   x_rot = x * cos + rotate_half(x) * sin,  rotate_half(x) = cat(-x[d/2:], x[:d/2]).
// So dimension i pairs with i + d/2 (not 2i with 2i+1 as in Meta's original checkpoints and
// GGUF's "normal" rope; see docs/PARALLELISM.md for the q/k row permutation between them).
#pragma once

#include <ATen/ATen.h>

#include "core/model/forward_batch.h"

namespace andy {

// Causal scaled-dot-product attention with grouped-query heads, the one attention function of
// the model. q [B, H, T, d]; k, v [B, H_kv, S, d] with H % H_kv == 0 (kv head j serves query
// heads j*H/H_kv .. (j+1)*H/H_kv - 1, Hugging Face's repeat_kv). Query i sits at absolute
// position q_offset + i and key j at position j; a query sees keys at positions <= its own
// (q_offset = S - T for incremental decoding with a cache, 0 for a full forward).
// Uses at::scaled_dot_product_attention where the LibTorch version has it
// (compat::kHasFusedSdpa: flash / memory-efficient kernels on GPU) and the explicit
// softmax(q k^T / sqrt(d) + mask) v otherwise (1.13), softmax in fp32. Returns [B, H, T, d].
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     int64_t q_offset);

// Stores the keys and values of new tokens, k and v [N, H_kv, d], at flat cache slots `slots`
// [N] (block * block_size + offset, int64) of one layer's k_cache and v_cache, in the block
// layouts of core/model/kv_cache.h (converted to the cache's dtype).
void write_kv_cache(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k,
                    const at::Tensor& v);

// Attention of packed queries over a paged KV cache (the inference path; no autograd).
// q [N, H, d]: the batch's new tokens (rows grouped by sequence as in `batch`); k_cache
// [num_blocks, H_kv, d, block_size] and v_cache [num_blocks, H_kv, block_size, d] (one layer of
// KvCache) already holding this step's keys and values. Each row attends to its sequence's cached positions up to its own (causal). Decodes
// (one new token) are computed together over keys gathered to the longest context; prefills
// and chunks one sequence at a time. Grouped-query heads share their kv head's keys and values
// (a prefill's g query heads as one matrix of g * t rows), never repeating K/V. Softmax in fp32, scores scaled by 1/sqrt(d), as attention(). Returns [N, H, d].
// k_new, v_new [N, H_kv, d] (optional): this step's keys and values as written to the cache. A
// prefill with no earlier context reads them instead of gathering its blocks back, where the
// cache holds them exactly (the same dtype).
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const ForwardBatch& batch,
                           int64_t block_size, const at::Tensor& k_new = {}, const at::Tensor& v_new = {});

// Rotary tables for positions [0, max_seq_len): cos and sin, each [max_seq_len, head_dim] fp32.
struct RopeTables {
  at::Tensor cos, sin;
};
RopeTables make_rope_tables(int64_t head_dim, int64_t max_seq_len, double theta);
// Applying them: rope_bthd in core/model/fused_ops.h (x [B, T, H, d], cos/sin rows gathered at
// each token's position, [B, T, d]).

}  // namespace andy
