// The attention function (fused SDPA where available, explicit on LibTorch 1.13) and RoPE.
#include "core/model/attention.h"

#include <cmath>
#include <limits>

#include "core/base/error.h"
#include "core/base/torch_compat.h"

namespace andy {

namespace {

// [T, S] true where query i (position q_offset + i) may see key j.
at::Tensor causal_mask(int64_t t, int64_t s, int64_t q_offset, const at::Device& device) {
  auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  at::Tensor qpos = at::arange(t, opts).add_(q_offset).unsqueeze(1);
  at::Tensor kpos = at::arange(s, opts).unsqueeze(0);
  return kpos.le(qpos);
}

at::Tensor explicit_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              int64_t q_offset) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = at::matmul(q, k.transpose(-2, -1)).mul(scale);
  at::Tensor allowed = causal_mask(q.size(2), k.size(2), q_offset, q.device());
  scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
  at::Tensor probs = at::softmax(scores, -1, at::kFloat).to(q.scalar_type());
  return at::matmul(probs, v);
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
  at::Tensor k = h == h_kv ? k_in : k_in.repeat_interleave(h / h_kv, 1);
  at::Tensor v = h == h_kv ? v_in : v_in.repeat_interleave(h / h_kv, 1);
  if constexpr (compat::kHasFusedSdpa) {
    if (q_offset == 0 && q.size(2) == k.size(2)) return compat::fused_sdpa(q, k, v, {}, true);
    return compat::fused_sdpa(q, k, v, causal_mask(q.size(2), k.size(2), q_offset, q.device()),
                              false);
  }
  return explicit_attention(q, k, v, q_offset);
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

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor c = cos.unsqueeze(1).to(x.scalar_type()), s = sin.unsqueeze(1).to(x.scalar_type());
  at::Tensor rotated = at::cat({x.narrow(-1, half, half).neg(), x.narrow(-1, 0, half)}, -1);
  return x * c + rotated * s;
}

}  // namespace andy
