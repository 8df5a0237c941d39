// paged_attention (core/model/attention.h) against dense attention computed in fp64 from the same
// cache contents: decodes (the CPU decode kernel, on each instruction set this CPU has) and a
// prefill chunk mixed in one batch, for an fp32, a bf16 and an fp16 KV cache
// (serve.kv_cache_dtype), head sizes 16 and 64 (the kernel's register-blocked paths) and 24 (its
// generic one), grouped kv heads, scattered blocks, blocks of 4, 16 and 24 tokens (shorter than
// the kernel's 8 or 16 keys, equal, and with a remainder). The cache is filled by
// write_kv_cache, whose block layout is checked element by element. Fresh prefills that read the
// step's own keys and values against the path that reads them back from the cache.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <vector>

#include "core/model/attention.h"
#include "core/model/decode_attention_cpu.h"
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

// Restores the decode kernel's instruction set limit when a test ends.
struct IsaLimit {
  explicit IsaLimit(CpuIsa isa) { decode_attention_cpu_limit_isa(isa); }
  ~IsaLimit() { decode_attention_cpu_limit_isa(CpuIsa::kAvx512); }
};

// Caches of `num_blocks` blocks holding k32 / v32 [num_blocks * block_size, H_kv, d] (slot
// order), written through write_kv_cache in `dtype`.
std::pair<at::Tensor, at::Tensor> filled_cache(const at::Tensor& k32, const at::Tensor& v32, int64_t block_size,
                                               at::ScalarType dtype) {
  const int64_t slots = k32.size(0), h_kv = k32.size(1), d = k32.size(2), nb = slots / block_size;
  at::Tensor k_cache = at::zeros({nb, h_kv, d, block_size}, at::TensorOptions().dtype(dtype));
  at::Tensor v_cache = at::zeros({nb, h_kv, block_size, d}, at::TensorOptions().dtype(dtype));
  // In two calls, slots out of order.
  at::Tensor perm = at::randperm(slots, at::kLong), first = perm.narrow(0, 0, slots / 3), rest = perm.narrow(0, slots / 3, slots - slots / 3);
  write_kv_cache(k_cache, v_cache, first, k32.index_select(0, first), v32.index_select(0, first));
  write_kv_cache(k_cache, v_cache, rest, k32.index_select(0, rest), v32.index_select(0, rest));
  return {k_cache, v_cache};
}

TEST(PagedAttention, WriteKvCachePutsEveryTokenInItsBlockSlot) {
  const int64_t block_size = 4, h_kv = 3, d = 5, nb = 6;
  at::manual_seed(3);
  at::Tensor k32 = at::randn({nb * block_size, h_kv, d}), v32 = at::randn({nb * block_size, h_kv, d});
  auto [k_cache, v_cache] = filled_cache(k32, v32, block_size, at::kFloat);
  for (int64_t slot = 0; slot < nb * block_size; ++slot)
    for (int64_t j = 0; j < h_kv; ++j)
      for (int64_t x = 0; x < d; ++x) {
        const int64_t b = slot / block_size, o = slot % block_size;
        ASSERT_EQ(k_cache[b][j][x][o].item<float>(), k32[slot][j][x].item<float>()) << slot << " " << j << " " << x;
        ASSERT_EQ(v_cache[b][j][o][x].item<float>(), v32[slot][j][x].item<float>()) << slot << " " << j << " " << x;
      }
  // The indexing path (GPU caches; here a CPU cache that is not contiguous) gives the same.
  at::Tensor k_wide = at::zeros({nb, h_kv, d, block_size + 1}), v_wide = at::zeros({nb, h_kv, block_size + 1, d});
  at::Tensor k_view = k_wide.narrow(3, 0, block_size), v_view = v_wide.narrow(2, 0, block_size);
  ASSERT_FALSE(k_view.is_contiguous());
  at::Tensor all = at::arange(nb * block_size, at::kLong);
  write_kv_cache(k_view, v_view, all, k32, v32);
  EXPECT_TRUE(at::equal(k_view, k_cache));
  EXPECT_TRUE(at::equal(v_view, v_cache));
  // A slot outside the cache is refused, naming it.
  at::Tensor bad = at::tensor(std::vector<int64_t>{nb * block_size}, at::kLong);
  try {
    write_kv_cache(k_cache, v_cache, bad, k32.narrow(0, 0, 1), v32.narrow(0, 0, 1));
    FAIL() << "no error";
  } catch (const std::exception& e) {
    EXPECT_NE(std::string(e.what()).find("slot 24"), std::string::npos) << e.what();
  }
}

TEST(PagedAttention, MatchesDenseAttentionForEveryCacheDtype) {
  const int64_t num_blocks = 64;
  const std::vector<CpuIsa> isas = decode_attention_cpu_isas();
  ASSERT_GE(isas.size(), 1u);
  for (const CpuIsa isa : isas)
  for (const int64_t block_size : {4, 16, 24})
  for (const Geometry geo : {Geometry{8, 4, 16}, Geometry{4, 4, 16}, Geometry{4, 2, 64}, Geometry{6, 3, 24}, Geometry{6, 2, 16}, Geometry{4, 2, 15}}) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      IsaLimit limit(isa);
      ASSERT_EQ(decode_attention_cpu_isa(), isa) << cpu_isa_name(isa);
      at::manual_seed(11);
      at::Tensor k32 = at::randn({num_blocks * block_size, geo.n_kv_head, geo.head_dim});
      at::Tensor v32 = at::randn({num_blocks * block_size, geo.n_kv_head, geo.head_dim});
      auto [k_cache, v_cache] = filled_cache(k32, v32, block_size, dtype);
      const at::Tensor k_flat = k32.to(dtype), v_flat = v32.to(dtype);  // the reference's view
      // Decodes with contexts 1, 5, 17, 33 and 70 (block tables out of order), and a 3-token chunk.
      ForwardBatch b;
      auto table = [&](std::vector<int64_t> t, int64_t ctx) {
        t.resize(static_cast<size_t>((ctx + block_size - 1) / block_size));
        return t;
      };
      b.add_sequence({0}, 1, table({7}, 1));
      b.add_sequence({0}, 5, table({3, 40}, 5));
      b.add_sequence({0, 0, 0}, 10, table({9, 1, 22}, 10));
      b.add_sequence({0}, 17, table({60, 2, 13, 31, 5}, 17));
      b.add_sequence({0}, 33, table({11, 50, 12, 6, 44, 45, 20, 21, 30}, 33));
      b.add_sequence({0}, 70, table({63, 4, 8, 10, 14, 15, 16, 17, 18, 19, 23, 24, 25, 26, 27, 28, 29, 32}, 70));
      at::Tensor q = at::randn({b.num_tokens(), geo.n_head, geo.head_dim});
      at::Tensor got = paged_attention(q, k_cache, v_cache, b, block_size);
      at::Tensor want = reference(q, k_flat, v_flat, b, block_size);
      const double rel = (got.to(at::kDouble) - want).norm().item<double>() / want.norm().item<double>();
      EXPECT_LT(rel, 1e-5) << "isa " << static_cast<int>(isa) << ", block " << block_size << ", head_dim "
                           << geo.head_dim << ", " << geo.n_head << "/" << geo.n_kv_head << " heads, cache " << dtype;
      // The gathering path (GPU caches; here caches that are not contiguous) agrees too.
      if (dtype == at::kFloat && isa == isas.back()) {
        at::Tensor k_wide = at::zeros({num_blocks, geo.n_kv_head, geo.head_dim, block_size + 1});
        at::Tensor v_wide = at::zeros({num_blocks, geo.n_kv_head, block_size + 1, geo.head_dim});
        at::Tensor k_view = k_wide.narrow(3, 0, block_size), v_view = v_wide.narrow(2, 0, block_size);
        k_view.copy_(k_cache);
        v_view.copy_(v_cache);
        at::Tensor gathered = paged_attention(q, k_view, v_view, b, block_size);
        EXPECT_LT((gathered.to(at::kDouble) - want).norm().item<double>() / want.norm().item<double>(), 1e-5);
      }
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

// Fresh prefills (no earlier context) read the step's own keys and values (k_new, v_new) in
// place of their blocks where the cache holds them exactly (the same dtype), and the cache
// otherwise; chunks after a prefix and decodes always read the cache. Prompts of 1 to 40 tokens,
// grouped heads, blocks of 16.
TEST(PagedAttention, FreshPrefillsReadTheNewKeysAndMatchTheCachePath) {
  const int64_t block_size = 16, num_blocks = 32;
  for (const Geometry geo : {Geometry{8, 4, 16}, Geometry{6, 2, 24}, Geometry{4, 4, 64}})
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    at::manual_seed(5);
    at::Tensor k32 = at::randn({num_blocks * block_size, geo.n_kv_head, geo.head_dim});
    at::Tensor v32 = at::randn({num_blocks * block_size, geo.n_kv_head, geo.head_dim});
    auto [k_cache, v_cache] = filled_cache(k32, v32, block_size, dtype);
    ForwardBatch b;
    std::vector<int64_t> slots;  // each new token's cache slot, in row order
    auto add = [&](int64_t t, int64_t ctx, std::vector<int64_t> table) {
      b.add_sequence(std::vector<int64_t>(static_cast<size_t>(t), 0), ctx, table);
      for (int64_t p = ctx - t; p < ctx; ++p) slots.push_back(table[p / block_size] * block_size + p % block_size);
    };
    add(40, 40, {5, 17, 2});      // fresh prefills
    add(1, 7, {9});               // a decode
    add(16, 16, {30});
    add(5, 21, {11, 3});          // a chunk after 16 cached tokens
    add(1, 1, {20});              // a fresh one-token prompt (computed as a decode)
    add(23, 23, {8, 25});
    const at::Tensor idx = at::tensor(slots, at::kLong);
    const at::Tensor k_new = k32.index_select(0, idx).to(dtype), v_new = v32.index_select(0, idx).to(dtype);
    at::Tensor q = at::randn({b.num_tokens(), geo.n_head, geo.head_dim});
    const at::Tensor cache_path = paged_attention(q, k_cache, v_cache, b, block_size);
    const at::Tensor new_path = paged_attention(q, k_cache, v_cache, b, block_size, k_new, v_new);
    const at::Tensor want = reference(q, k32.to(dtype), v32.to(dtype), b, block_size);
    const std::string what = std::to_string(geo.n_head) + "/" + std::to_string(geo.n_kv_head) + " heads of " +
                             std::to_string(geo.head_dim) + ", cache " + c10::toString(dtype);
    EXPECT_LT((new_path.to(at::kDouble) - want).norm().item<double>() / want.norm().item<double>(), 1e-5) << what;
    EXPECT_LT((cache_path.to(at::kDouble) - want).norm().item<double>() / want.norm().item<double>(), 1e-5) << what;
    // Where the new keys are not what the cache holds (fp32 keys, a bf16 cache), the cache is read.
    if (dtype != at::kFloat) {
      const at::Tensor mismatched = paged_attention(q, k_cache, v_cache, b, block_size, k32.index_select(0, idx),
                                                    v32.index_select(0, idx));
      EXPECT_TRUE(at::equal(mismatched, cache_path)) << what;
    }
  }
}

}  // namespace
}  // namespace andy
