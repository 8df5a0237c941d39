// Block-structured KV cache and its block allocator (see kv_cache.h).
#include "core/model/kv_cache.h"

#include "core/base/error.h"
#include "core/base/huge_pages.h"
#include "core/model/model_config.h"

namespace andy {

at::Tensor cpu_zeros_on_huge_pages(at::IntArrayRef sizes, at::TensorOptions options) {
  int64_t numel = 1;
  for (int64_t n : sizes) numel *= n;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  void* p = alloc_huge_pages(bytes);
  ANDY_CHECK(p, "out of memory: ", bytes, " bytes for a CPU tensor of shape ", sizes);
  return at::from_blob(p, sizes, [bytes](void* q) { free_huge_pages(q, bytes); }, options.device(at::kCPU));
}

KvCache::KvCache(const ModelConfig& cfg, int tp_size, int64_t block_size, int64_t num_blocks,
                 at::TensorOptions options)
    : block_size_(block_size), num_blocks_(num_blocks) {
  validate_model_shapes(cfg, tp_size);
  ANDY_CHECK_T(ConfigError, block_size > 0 && num_blocks > 0, "KvCache: block_size (", block_size,
               ") and num_blocks (", num_blocks, ") must be positive");
  const int64_t kv_local = cfg.n_kv_head / tp_size;
  // One pool for every layer's keys and values; each layer's K and V are contiguous views, in
  // the block layouts of kv_cache.h.
  const int64_t d = head_dim(cfg);
  const std::vector<int64_t> shape = {2, cfg.n_layer, num_blocks, kv_local * d * block_size};
  const at::Tensor pool =
      options.device().is_cpu() ? cpu_zeros_on_huge_pages(shape, options) : at::zeros(shape, options);
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    k_.push_back(pool[0][l].view({num_blocks, kv_local, d, block_size}));
    v_.push_back(pool[1][l].view({num_blocks, kv_local, block_size, d}));
  }
  for (int64_t b = 0; b < num_blocks; ++b) free_.insert(b);
}

void KvCache::reserve(KvSequence& seq, int64_t n_new) {
  const int64_t need_tokens = seq.length + n_new;
  const int64_t need_blocks =
      (need_tokens + block_size_ - 1) / block_size_ - static_cast<int64_t>(seq.block_table.size());
  if (need_blocks <= 0) return;
  ANDY_CHECK(need_blocks <= num_free_blocks(), "KvCache: ", need_blocks, " more blocks of ",
             block_size_, " tokens needed for a sequence of ", need_tokens, " tokens, but only ",
             num_free_blocks(), " of ", num_blocks_, " blocks are free");
  for (int64_t i = 0; i < need_blocks; ++i) {
    seq.block_table.push_back(*free_.begin());
    free_.erase(free_.begin());
  }
}

void KvCache::release(KvSequence& seq) {
  for (int64_t b : seq.block_table) free_.insert(b);
  seq.block_table.clear();
  seq.length = 0;
}

at::Tensor KvCache::slots(const KvSequence& seq, int64_t start, int64_t n) const {
  ANDY_CHECK(start + n <= seq.capacity(block_size_), "KvCache: positions up to ", start + n,
             " requested but the sequence's block table holds ", seq.capacity(block_size_),
             " tokens (call reserve first)");
  std::vector<int64_t> out(n);
  for (int64_t i = 0; i < n; ++i) {
    int64_t p = start + i;
    out[i] = seq.block_table[p / block_size_] * block_size_ + p % block_size_;
  }
  return at::tensor(out, at::TensorOptions().dtype(at::kLong)).to(k_.at(0).device());
}

}  // namespace andy
