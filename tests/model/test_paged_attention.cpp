// paged_attention (core/model/attention.h) against dense attention computed in fp64 from the same
// cache contents: decodes (the CPU decode kernel) and a prefill chunk mixed in one batch, for an
// fp32, a bf16 and an fp16 KV cache (serve.kv_cache_dtype), head sizes 16 and 64 (the kernel's
// register-blocked paths) and 24 (its generic one), grouped kv heads, scattered blocks.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "core/model/attention.h"
#include "core/model/forward_batch.h"

namespace andy {
namespace {

struct Geometry {
  int64_t n_head, n_kv_head, head_dim;
};

// Reference: row r of sequence s (position p) attends to positions 0..p of s, in fp64.
at::Tensor reference(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const ForwardBatch& b, int64_t block_size) {
  const int64_t h = q.size(1), d = q.size(2), h_kv = k_cache.size(1), g = h / h_kv;
  at::Tensor qd = q.to(at::kDouble), kd = k_cache.to(at::kDouble), vd = v_cache.to(at::kDouble);
  at::Tensor out = at::zeros(q.sizes(), q.options().dtype(at::kDouble));
  for (int64_t s = 0; s < b.num_sequences(); ++s) {
    std::vector<int64_t> slots;
    for (int64_t p = 0; p < b.context_len[s]; ++p)
      slots.push_back(b.block_tables[s][p / block_size] * block_size + p % block_size);
    at::Tensor idx = at::tensor(slots, at::kLong);
    at::Tensor keys = kd.index_select(0, idx), vals = vd.index_select(0, idx);  // [ctx, h_kv, d]
    for (int64_t i = 0; i < b.query_len(s); ++i) {
      const int64_t row = b.query_start[s] + i, pos = b.context_len[s] - b.query_len(s) + i;
      for (int64_t hh = 0; hh < h; ++hh) {
        at::Tensor kk = keys.narrow(0, 0, pos + 1).select(1, hh / g);  // [pos + 1, d]
        at::Tensor vv = vals.narrow(0, 0, pos + 1).select(1, hh / g);
        at::Tensor sc = at::mv(kk, qd[row][hh]) / std::sqrt(static_cast<double>(d));
        out[row][hh] = at::mv(vv.t(), at::softmax(sc, 0));
      }
    }
  }
  return out;
}

TEST(PagedAttention, MatchesDenseAttentionForEveryCacheDtype) {
  const int64_t num_blocks = 64;
  for (const int64_t block_size : {4, 16})  // blocks shorter than the kernel's 8 rows, and longer
  for (const Geometry geo : {Geometry{8, 4, 16}, Geometry{4, 4, 16}, Geometry{4, 2, 64}, Geometry{6, 3, 24}}) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      at::manual_seed(11);
      at::Tensor k32 = at::randn({num_blocks * block_size, geo.n_kv_head, geo.head_dim});
      at::Tensor v32 = at::randn({num_blocks * block_size, geo.n_kv_head, geo.head_dim});
      const at::Tensor k_cache = k32.to(dtype), v_cache = v32.to(dtype);
      // Decodes with contexts 1, 5, 17 and 33 (block tables out of order), and a 3-token chunk.
      ForwardBatch b;
      b.add_sequence({0}, 1, {7});
      b.add_sequence({0}, 5, {3, 40});
      b.add_sequence({0, 0, 0}, 10, {9, 1, 22});
      b.add_sequence({0}, 17, {60, 2, 13, 31, 5});
      b.add_sequence({0}, 33, {11, 50, 12, 6, 44, 45, 20, 21, 30});
      at::Tensor q = at::randn({b.num_tokens(), geo.n_head, geo.head_dim});
      at::Tensor got = paged_attention(q, k_cache, v_cache, b, block_size);
      at::Tensor want = reference(q, k_cache, v_cache, b, block_size);
      const double rel = (got.to(at::kDouble) - want).norm().item<double>() / want.norm().item<double>();
      EXPECT_LT(rel, 1e-5) << "block " << block_size << ", head_dim " << geo.head_dim << ", " << geo.n_head << "/" << geo.n_kv_head
                           << " heads, cache " << dtype;
      // The cache really holds the narrower type: its rounding shows against the fp32 values.
      if (dtype != at::kFloat) {
        at::Tensor exact = reference(q, k32, v32, b, block_size);
        const double drift = (got.to(at::kDouble) - exact).norm().item<double>() / exact.norm().item<double>();
        EXPECT_GT(drift, 1e-5) << dtype;
        EXPECT_LT(drift, dtype == at::kBFloat16 ? 2e-2 : 2e-3) << dtype;
      }
    }
  }
}

}  // namespace
}  // namespace andy
