// Key/value cache for incremental decoding, laid out in blocks of a fixed number of tokens so
// the server can page it (vLLM's PagedAttention), each block head-major as vLLM's:
//   k(layer): [num_blocks, n_kv_head_local, head_dim, block_size]  (each head's keys transposed)
//   v(layer): [num_blocks, n_kv_head_local, block_size, head_dim]
// so one kv head's keys (or values) in a block are one contiguous run, and a decode step's
// scores for a block are head_dim vector products over block_size keys at once (the CPU
// kernel, core/model/decode_attention_cpu.h). write_kv_cache and paged_attention
// (core/model/attention.h) are the only code that reads or writes them by token.
// A sequence owns a block table (block ids, in token order) and a length; token p of the
// sequence lives in block table[p / block_size], slot p % block_size. Each TP rank holds the
// cache for its own kv heads only. Blocks are handed out lowest id first, so ranks that make
// the same calls hold identical tables (the server may instead broadcast tables from rank 0).
// On CPU the pool sits on transparent huge pages (core/base/huge_pages.h). Not thread-safe.
//
//   KvCache cache(cfg, tp_size, /*block_size=*/16, /*num_blocks=*/64);
//   std::vector<KvSequence> seqs(batch);
//   for (auto& s : seqs) cache.reserve(s, prompt_len);     // allocate blocks
//   logits = model->forward_cached(prompts, cache, seqs);  // each seqs[b].length += prompt_len
#pragma once

#include <ATen/ATen.h>

#include <set>
#include <vector>

#include "core/config/config.h"

namespace andy {

// Zeroed CPU tensor on transparent huge pages (core/base/huge_pages.h), freed with its storage.
at::Tensor cpu_zeros_on_huge_pages(at::IntArrayRef sizes, at::TensorOptions options);

struct KvSequence {
  std::vector<int64_t> block_table;  // block ids in token order
  int64_t length = 0;                // tokens already cached (the next token's position)
  int64_t capacity(int64_t block_size) const {
    return static_cast<int64_t>(block_table.size()) * block_size;
  }
};

class KvCache {
 public:
  // Cache for `cfg` split over `tp_size` ranks; `options` gives dtype/device (Default: fp32 CPU).
  KvCache(const ModelConfig& cfg, int tp_size, int64_t block_size, int64_t num_blocks,
          at::TensorOptions options = at::TensorOptions().dtype(at::kFloat));

  at::Tensor& k(int64_t layer) { return k_.at(layer); }
  at::Tensor& v(int64_t layer) { return v_.at(layer); }
  int64_t n_layer() const { return static_cast<int64_t>(k_.size()); }
  int64_t block_size() const { return block_size_; }
  int64_t num_blocks() const { return num_blocks_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }

  // Allocates blocks until `seq` can hold seq.length + n_new tokens. Throws Error (naming the
  // counts) when the cache has too few free blocks; nothing is allocated then.
  void reserve(KvSequence& seq, int64_t n_new);
  // Returns the sequence's blocks to the free list and empties it.
  void release(KvSequence& seq);

  // Flat slot index (block * block_size + offset) of each position in [start, start + n).
  at::Tensor slots(const KvSequence& seq, int64_t start, int64_t n) const;

 private:
  int64_t block_size_, num_blocks_;
  std::vector<at::Tensor> k_, v_;
  std::set<int64_t> free_;
};

}  // namespace andy
