// The attention function (fused SDPA where available, explicit on LibTorch 1.13) and RoPE.
#include "core/model/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/base/error.h"
#include "core/base/torch_compat.h"
#include "core/model/decode_attention_cpu.h"
#include "core/model/fused_ops.h"
#include "parallel/cpu_gemm.h"

namespace andy {

namespace {

// q [B, H, T, d], k/v [B, H_kv, S, d] with H = g * H_kv: each kv head's g query heads as one
// [g * T, d] matrix against its keys, so K and V are never repeated g times.
at::Tensor explicit_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              int64_t q_offset) {
  const int64_t b = q.size(0), h = q.size(1), t = q.size(2), d = q.size(3);
  const int64_t h_kv = k.size(1), s = k.size(2), g = h / h_kv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  at::Tensor qg = q.reshape({b, h_kv, g * t, d});
  // cpu_matmul: oneDNN's sgemm for CPU fp32 (parallel/cpu_gemm.h), at::matmul otherwise.
  at::Tensor scores = cpu_matmul(qg, k.transpose(-2, -1)).view({b, h_kv, g, t, s});
  at::Tensor probs = causal_softmax(scores, scale, q_offset).view({b, h_kv, g * t, s});  // fused on CPU
  return cpu_matmul(probs, v).view({b, h, t, d});
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k_in, const at::Tensor& v_in,
                     int64_t q_offset) {
  ANDY_CHECK(q.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4,
             "attention: expected [B, H, T, d] tensors");
  const int64_t h = q.size(1), h_kv = k_in.size(1);
  ANDY_CHECK(h % h_kv == 0, "attention: ", h, " query heads are not a multiple of ", h_kv,
             " kv heads");
  ANDY_CHECK(q_offset >= 0 && q_offset + q.size(2) <= k_in.size(2),
             "attention: queries at positions ", q_offset, "..", q_offset + q.size(2) - 1,
             " but only ", k_in.size(2), " keys");
  if constexpr (compat::kHasFusedSdpa) {
    at::Tensor k = h == h_kv ? k_in : k_in.repeat_interleave(h / h_kv, 1);
    at::Tensor v = h == h_kv ? v_in : v_in.repeat_interleave(h / h_kv, 1);
    if (q_offset == 0 && q.size(2) == k.size(2)) return compat::fused_sdpa(q, k, v, {}, true);
    return compat::fused_sdpa(q, k, v, causal_mask(q.size(2), k.size(2), q_offset, q.device()),
                              false);
  }
  if (q_offset == 0 && q.size(2) == k_in.size(2)) {  // whole sequences: in [B, T, H, d], causal blocks
    const at::Tensor qt = q.transpose(1, 2), kt = k_in.transpose(1, 2), vt = v_in.transpose(1, 2);
    if (causal_attention_cpu_applies(qt, kt, vt)) return causal_attention_cpu(qt, kt, vt).transpose(1, 2);
  }
  return explicit_attention(q, k_in, v_in, q_offset);
}

namespace {

// Keys or values of sequences gathered block by block into token order (tables padded with
// block 0 to `n_blocks`): k_cache [blocks, H_kv, d, bs] or v_cache [blocks, H_kv, bs, d] (the
// layouts of kv_cache.h) -> [n, n_blocks * bs, H_kv, d].
at::Tensor gather_blocks(const at::Tensor& cache, bool keys, const std::vector<int64_t>& padded_tables, int64_t n,
                         int64_t n_blocks, const at::Device& device) {
  const int64_t h_kv = cache.size(1), d = keys ? cache.size(2) : cache.size(3), bs = keys ? cache.size(3) : cache.size(2);
  at::Tensor idx = at::tensor(padded_tables, at::kLong).to(device);
  at::Tensor g = cache.index_select(0, idx).view({n, n_blocks, h_kv, keys ? d : bs, keys ? bs : d});
  return (keys ? g.permute({0, 1, 4, 2, 3}) : g.permute({0, 1, 3, 2, 4})).reshape({n, n_blocks * bs, h_kv, d});
}

// Block tables of `seqs`, each padded with block 0 to the longest one.
std::vector<int64_t> padded_tables(const ForwardBatch& batch, const std::vector<int64_t>& seqs,
                                   int64_t n_blocks) {
  std::vector<int64_t> out;
  out.reserve(seqs.size() * n_blocks);
  for (int64_t s : seqs) {
    const auto& t = batch.block_tables[s];
    for (int64_t j = 0; j < n_blocks; ++j) out.push_back(j < static_cast<int64_t>(t.size()) ? t[j] : 0);
  }
  return out;
}

// The decodes of the batch (one new token each), in one batched product over their keys
// gathered to the longest context (shorter ones masked).
void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const ForwardBatch& batch, const std::vector<int64_t>& seqs,
                      int64_t block_size, at::Tensor& out) {
  const int64_t n = static_cast<int64_t>(seqs.size());
  const int64_t h = q.size(1), d = q.size(2), h_kv = k_cache.size(1), g = h / h_kv;
  int64_t n_blocks = 0;
  std::vector<int64_t> rows, lens;
  for (int64_t s : seqs) {
    n_blocks = std::max(n_blocks, (batch.context_len[s] + block_size - 1) / block_size);
    rows.push_back(batch.query_start[s]);
    lens.push_back(batch.context_len[s]);
  }
  const int64_t width = n_blocks * block_size;
  const std::vector<int64_t> tables = padded_tables(batch, seqs, n_blocks);
  at::Tensor keys = gather_blocks(k_cache, true, tables, n, n_blocks, q.device()).to(q.scalar_type());
  at::Tensor vals = gather_blocks(v_cache, false, tables, n, n_blocks, q.device()).to(q.scalar_type());
  auto long_opts = at::TensorOptions().dtype(at::kLong).device(q.device());
  at::Tensor row_t = at::tensor(rows, at::kLong).to(q.device());
  at::Tensor qd = q.index_select(0, row_t).view({n, h_kv, g, d});
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  at::Tensor scores = at::matmul(qd, keys.permute({0, 2, 3, 1})).mul_(scale);  // [n, h_kv, g, width]
  at::Tensor valid = at::arange(width, long_opts).unsqueeze(0).lt(
      at::tensor(lens, at::kLong).to(q.device()).unsqueeze(1));  // [n, width]
  scores.masked_fill_(valid.logical_not().view({n, 1, 1, width}),
                      -std::numeric_limits<float>::infinity());
  at::Tensor probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  at::Tensor o = at::matmul(probs, vals.permute({0, 2, 1, 3}));  // [n, h_kv, g, d]
  out.index_copy_(0, row_t, o.reshape({n, h, d}));
}

// One sequence with several new tokens (a prefill or a chunk of one): causal over its context.
// The g query heads of a kv head are one matrix of g * t rows, so each product is one plain
// batched product over the kv heads (oneDNN's sgemm on CPU, parallel/cpu_gemm.h).
void prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                       const at::Tensor& k_new, const at::Tensor& v_new, const ForwardBatch& batch, int64_t s,
                       int64_t block_size, at::Tensor& out) {
  const int64_t t = batch.query_len(s), ctx = batch.context_len[s], start = batch.query_start[s];
  const int64_t h = q.size(1), d = q.size(2), h_kv = k_cache.size(1), g = h / h_kv;
  at::Tensor keys, vals;  // [ctx, h_kv, d]
  if (ctx == t && k_new.defined() && k_new.scalar_type() == k_cache.scalar_type() &&
      v_new.scalar_type() == v_cache.scalar_type()) {
    keys = k_new.narrow(0, start, t);
    vals = v_new.narrow(0, start, t);
  } else {
    const int64_t n_blocks = (ctx + block_size - 1) / block_size;
    const std::vector<int64_t> table = padded_tables(batch, {s}, n_blocks);
    keys = gather_blocks(k_cache, true, table, 1, n_blocks, q.device())[0].narrow(0, 0, ctx);
    vals = gather_blocks(v_cache, false, table, 1, n_blocks, q.device())[0].narrow(0, 0, ctx);
  }
  keys = keys.to(q.scalar_type());
  vals = vals.to(q.scalar_type());
  const at::Tensor qs = q.narrow(0, start, t).view({t, h_kv, g, d}).permute({1, 2, 0, 3}).reshape({h_kv, g * t, d});
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  const at::Tensor scores = cpu_matmul(qs, keys.permute({1, 2, 0}));  // [h_kv, g * t, ctx]
  const at::Tensor probs = causal_softmax(scores.view({h_kv, g, t, ctx}), scale, ctx - t);  // fused on CPU
  const at::Tensor o = cpu_matmul(probs.reshape({h_kv, g * t, ctx}), vals.permute({1, 0, 2}));  // [h_kv, g * t, d]
  out.narrow(0, start, t).view({t, h_kv, g, d}).copy_(o.view({h_kv, g, t, d}).permute({2, 0, 1, 3}));
}

}  // namespace

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const ForwardBatch& batch,
                           int64_t block_size, const at::Tensor& k_new, const at::Tensor& v_new) {
  ANDY_CHECK(q.dim() == 3 && q.size(0) == batch.num_tokens() && k_cache.dim() == 4 && v_cache.dim() == 4 &&
                 k_cache.size(3) == block_size &&
                 v_cache.sizes() == at::IntArrayRef({k_cache.size(0), k_cache.size(1), block_size, q.size(2)}) &&
                 k_cache.size(2) == q.size(2),
             "paged_attention: q [N, H, d] with N = ", batch.num_tokens(), ", k_cache [blocks, H_kv, d, ",
             block_size, "] and v_cache [blocks, H_kv, ", block_size, ", d] expected, got ", q.sizes(), ", ",
             k_cache.sizes(), " and ", v_cache.sizes());
  ANDY_CHECK(q.size(1) % k_cache.size(1) == 0, "paged_attention: ", q.size(1),
             " query heads are not a multiple of ", k_cache.size(1), " kv heads");
  ANDY_CHECK(!k_new.defined() || (k_new.sizes() == at::IntArrayRef({q.size(0), k_cache.size(1), q.size(2)}) &&
                                  v_new.defined() && v_new.sizes() == k_new.sizes()),
             "paged_attention: k_new and v_new [N, H_kv, d] = [", q.size(0), ", ", k_cache.size(1), ", ", q.size(2),
             "] expected, got ", k_new.sizes(), " and ", v_new.defined() ? v_new.sizes() : at::IntArrayRef{});
  // A bf16 / fp16 model on CPU (serve.dtype): the CPU decode kernel reads fp32 queries (a few
  // KB per step) and the cache in its own dtype; LibTorch's generic path would gather the cache.
  if (q.is_cpu() && q.scalar_type() != at::kFloat && decode_attention_cpu_supports(k_cache.scalar_type()))
    return paged_attention(q.to(at::kFloat), k_cache, v_cache, batch, block_size, k_new, v_new).to(q.scalar_type());
  at::Tensor out = at::empty(q.sizes(), q.options());  // contiguous
  std::vector<int64_t> decodes;
  for (int64_t s = 0; s < batch.num_sequences(); ++s) {
    if (batch.query_len(s) == 1)
      decodes.push_back(s);
    else
      prefill_attention(q, k_cache, v_cache, k_new, v_new, batch, s, block_size, out);
  }
  if (decodes.empty()) return out;
  const bool cpu_kernel = q.is_cpu() && q.scalar_type() == at::kFloat && k_cache.is_cpu() &&
                          k_cache.scalar_type() == v_cache.scalar_type() &&
                          decode_attention_cpu_supports(k_cache.scalar_type()) && k_cache.is_contiguous() &&
                          v_cache.is_contiguous();
  if (!cpu_kernel) {
    decode_attention(q, k_cache, v_cache, batch, decodes, block_size, out);
    return out;
  }
  const at::Tensor qc = q.contiguous();
  DecodeAttentionArgs a;
  a.q = qc.data_ptr<float>();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.kv_dtype = k_cache.scalar_type();
  a.out = out.data_ptr<float>();
  a.n_head = q.size(1);
  a.n_kv_head = k_cache.size(1);
  a.head_dim = q.size(2);
  a.block_size = block_size;
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(q.size(2))));
  for (int64_t s : decodes) {
    a.rows.push_back(batch.query_start[s]);
    a.context_len.push_back(batch.context_len[s]);
    a.tables.push_back(&batch.block_tables[s]);
  }
  decode_attention_cpu(a);
  return out;
}

void write_kv_cache(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& k,
                    const at::Tensor& v) {
  const int64_t n = slots.numel();
  ANDY_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == n &&
                 k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(2) &&
                 v_cache.sizes() == at::IntArrayRef({k_cache.size(0), k_cache.size(1), k_cache.size(3), k.size(2)}),
             "write_kv_cache: k, v [N, H_kv, d] for ", n, " slots into k_cache [blocks, H_kv, d, bs] and v_cache "
             "[blocks, H_kv, bs, d] expected, got ", k.sizes(), ", ", v.sizes(), ", ", k_cache.sizes(), " and ",
             v_cache.sizes());
  const int64_t h_kv = k_cache.size(1), d = k_cache.size(2), bs = k_cache.size(3);
  const at::Tensor kc = k.to(k_cache.scalar_type()).contiguous(), vc = v.to(v_cache.scalar_type()).contiguous();
  if (k_cache.is_cpu() && k_cache.is_contiguous() && v_cache.is_contiguous()) {
    // Element copies in place: a decode step writes a few KB, less than the dispatch of
    // LibTorch's indexing ops would cost. Typed by element size, so that the compiler copies a
    // key's d elements (strided by bs in the transposed block) without a call per element.
    const at::Tensor sl = slots.to(at::kLong).contiguous();
    const int64_t* slot = sl.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
      ANDY_CHECK(slot[i] >= 0 && slot[i] / bs < k_cache.size(0), "write_kv_cache: slot ", slot[i],
                 " outside the cache's ", k_cache.size(0) * bs, " slots");
    auto copy = [&](auto tag) {
      using E = decltype(tag);
      const E* ks = static_cast<const E*>(kc.data_ptr());
      const E* vs = static_cast<const E*>(vc.data_ptr());
      E* kd = static_cast<E*>(k_cache.data_ptr());
      E* vd = static_cast<E*>(v_cache.data_ptr());
      for (int64_t i = 0; i < n; ++i) {
        const int64_t block = slot[i] / bs, off = slot[i] % bs;
        for (int64_t j = 0; j < h_kv; ++j) {
          const E* ksrc = ks + (i * h_kv + j) * d;
          const E* vsrc = vs + (i * h_kv + j) * d;
          E* kdst = kd + (block * h_kv + j) * d * bs + off;  // [d, bs]: element x at x * bs
          E* vdst = vd + (block * h_kv + j) * d * bs + off * d;
          for (int64_t x = 0; x < d; ++x) kdst[x * bs] = ksrc[x];
          std::memcpy(vdst, vsrc, static_cast<size_t>(d) * sizeof(E));
        }
      }
    };
    switch (k_cache.element_size()) {
      case 4: copy(float{}); return;  // fp32
      case 2: copy(uint16_t{}); return;  // bf16, fp16: as their bits (decode_attention_cpu.cpp reads them so)
      default: ANDY_CHECK(false, "write_kv_cache: ", k_cache.scalar_type(), " cache (4- or 2-byte elements expected)");
    }
  }
  using at::indexing::Slice;
  const at::Tensor sl = slots.to(k_cache.device(), at::kLong);
  const at::Tensor block = at::div(sl, bs, "floor"), off = at::remainder(sl, bs);
  k_cache.index_put_({block, Slice(), Slice(), off}, kc);  // indexed dims first: [N, H_kv, d]
  v_cache.index_put_({block, Slice(), off, Slice()}, vc);
}

RopeTables make_rope_tables(int64_t head_dim, int64_t max_seq_len, double theta) {
  // As transformers' LlamaRotaryEmbedding: inv_freq = 1 / theta^(arange(0, d, 2).float() / d)
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor inv_freq =
      1.0 /
      at::pow(theta,
              at::arange(0, head_dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) /
                  head_dim);
  at::Tensor t = at::arange(max_seq_len, f32);
  at::Tensor freqs = at::outer(t, inv_freq);
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

}  // namespace andy
