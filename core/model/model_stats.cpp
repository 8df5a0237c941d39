// Parameter counts, training FLOPs per token and memory estimates (see model_stats.h).
#include "core/model/model_stats.h"

#include "core/base/format.h"

#include <cstdio>

#include "core/model/model_config.h"

namespace andy {

ParamCounts count_parameters(const ModelConfig& m) {
  ParamCounts c;
  const int64_t d = head_dim(m), ffn = derived_ffn_dim(m);
  c.embedding = m.vocab_size * m.dim;
  c.lm_head = m.tie_embeddings ? 0 : m.vocab_size * m.dim;
  c.per_layer = 2 * m.dim                      // two RMSNorms
                + m.dim * m.n_head * d * 2     // q_proj, o_proj
                + m.dim * m.n_kv_head * d * 2  // k_proj, v_proj
                + 3 * m.dim * ffn;             // gate, up, down
  c.final_norm = m.dim;
  c.total = c.embedding + c.lm_head + m.n_layer * c.per_layer + c.final_norm;
  return c;
}

double training_flops_per_token(const ModelConfig& m, int64_t seq_len) {
  ParamCounts c = count_parameters(m);
  const double n = static_cast<double>(c.total - (m.tie_embeddings ? 0 : c.embedding));
  return 6.0 * n + 12.0 * m.n_layer * m.n_head * head_dim(m) * static_cast<double>(seq_len);
}

MemoryEstimate estimate_memory(const ModelConfig& m, int tp, int64_t batch, int64_t seq_len,
                               const std::string& precision) {
  MemoryEstimate e;
  ParamCounts c = count_parameters(m);
  const double h = m.dim, f = derived_ffn_dim(m), kv = m.n_kv_head * head_dim(m);
  const double vp = padded_vocab_size(m, tp);
  const double replicated = m.n_layer * 2.0 * m.dim + m.dim;
  const double sharded = static_cast<double>(c.total) - replicated +
                         (vp - m.vocab_size) * m.dim * (m.tie_embeddings ? 1 : 2);
  const double local_params = sharded / tp + replicated;
  e.weights = 4.0 * local_params;
  e.gradients = 4.0 * local_params;
  e.optimizer = 8.0 * local_params;
  // Elements kept for backward per token: per layer, 4 dim-sized replicated tensors (norm
  // inputs and outputs), q/k/v before and after RoPE, expanded k/v and the attention output
  // (6 dim + 3 kv), the four SwiGLU intermediates (4 ffn), the attention probabilities
  // (n_head x seq_len); after the stack the final norm (2 dim) and the logits plus the
  // cross-entropy's softmax (2 padded vocab). Sharded parts divided by tp.
  const double per_layer =
      4.0 * h + (6.0 * h + 3.0 * kv + 4.0 * f + m.n_head * static_cast<double>(seq_len)) / tp;
  const double per_token = m.n_layer * per_layer + 2.0 * h + 2.0 * vp / tp;
  const double bytes = precision == "fp32" ? 4.0 : 2.0;
  e.activations = per_token * static_cast<double>(batch) * static_cast<double>(seq_len) * bytes;
  return e;
}

namespace {


std::string mib(double bytes) {
  char buf[64];
  if (bytes >= 1024.0 * 1024 * 1024)
    std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  else
    std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / (1024.0 * 1024));
  return buf;
}

}  // namespace

std::string model_summary(const Config& cfg) {
  const ModelConfig& m = cfg.model;
  const int tp = static_cast<int>(cfg.parallel.tensor_parallel_size);
  ParamCounts c = count_parameters(m);
  MemoryEstimate e =
      estimate_memory(m, tp, cfg.train.batch_size, cfg.data.seq_len, cfg.precision.mode);
  char buf[1024];
  std::string out;
  std::snprintf(
      buf, sizeof buf,
      "\n# ---- model summary ----\n"
      "# parameters: %s (%lld) = embedding %s%s + %lld layers x %s + final norm %lld\n",
      format_si(static_cast<double>(c.total), "").c_str(), static_cast<long long>(c.total),
      format_si(static_cast<double>(c.embedding), "").c_str(),
      m.tie_embeddings ? " (tied with the output head)"
                       : (" + lm_head " + format_si(static_cast<double>(c.lm_head), "")).c_str(),
      static_cast<long long>(m.n_layer), format_si(static_cast<double>(c.per_layer), "").c_str(),
      static_cast<long long>(c.final_norm));
  out += buf;
  std::snprintf(buf, sizeof buf,
                "# shapes: head_dim %lld, ffn_dim %lld%s, vocab %lld padded to %lld for "
                "tensor_parallel_size %d\n",
                static_cast<long long>(head_dim(m)), static_cast<long long>(derived_ffn_dim(m)),
                m.ffn_dim > 0 ? "" : " (derived)", static_cast<long long>(m.vocab_size),
                static_cast<long long>(padded_vocab_size(m, tp)), tp);
  out += buf;
  std::snprintf(buf, sizeof buf,
                "# training FLOPs per token: %s (6N + 12*L*H*Q*T at seq_len %lld)\n",
                format_si(training_flops_per_token(m, cfg.data.seq_len), "FLOP").c_str(),
                static_cast<long long>(cfg.data.seq_len));
  out += buf;
  std::snprintf(
      buf, sizeof buf,
      "# memory per rank (estimate; tp %d, micro-batch %lld x %lld tokens, %s): weights %s, "
      "gradients %s, AdamW %s, activations %s, total %s\n",
      tp, static_cast<long long>(cfg.train.batch_size), static_cast<long long>(cfg.data.seq_len),
      cfg.precision.mode.c_str(), mib(e.weights).c_str(), mib(e.gradients).c_str(),
      mib(e.optimizer).c_str(), mib(e.activations).c_str(), mib(e.total()).c_str());
  out += buf;
  return out;
}

double known_gpu_peak_tflops(const std::string& name, const std::string& mode) {
  // Vendor datasheet figures, dense. Most specific names first ("H100 PCIe" before "H100";
  // "GH200" matches "H200": its GPU has the same peak).
  struct Peak {
    const char* a;
    const char* b;  // a second substring that must also match ("" for none)
    double half, fp32;
  };
  static const Peak table[] = {
      {"H200", "", 989.4, 66.9},      {"H100", "PCIe", 756.5, 51.2}, {"H100", "NVL", 835.5, 59.8},
      {"H100", "", 989.4, 66.9},      {"H800", "", 989.4, 66.9},     {"A100", "", 312.0, 19.5},
      {"A800", "", 312.0, 19.5},      {"L40S", "", 362.1, 91.6},     {"A10G", "", 70.0, 31.2},
      {"V100", "", 125.0, 15.7},
  };
  for (const auto& p : table) {
    if (name.find(p.a) == std::string::npos) continue;
    if (*p.b && name.find(p.b) == std::string::npos) continue;
    if (mode == "fp32") return p.fp32;
    // V100 has no bf16 tensor cores: its bf16 matmuls run far below the fp16 peak.
    if (mode == "bf16" && std::string(p.a) == "V100") return 0;
    return p.half;
  }
  return 0;
}

}  // namespace andy
