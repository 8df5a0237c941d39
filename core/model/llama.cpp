// LLaMA modules over the tensor-parallel layers (see llama.h). Collectives per block, forward:
// all-reduce after o_proj and after down_proj; backward: all-reduce of the input gradient of
// the q/k/v and gate/up groups (one each: the input is copied to the TP region once).
#include "core/model/llama.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "core/base/avx2_math.h"
#include "core/base/error.h"
#include "core/model/fused_ops.h"
#include "core/model/model_config.h"
#include "parallel/cpu_gemm.h"
#include "parallel/tp_cross_entropy.h"
#include "parallel/tp_ops.h"

namespace andy {

namespace {

// Residual-stream output projections (o_proj, down_proj) start with std / sqrt(2 n_layer), as
// GPT-2 and Megatron-LM do; every other matrix with init_std; norms with ones.
double residual_std(const ModelConfig& cfg) { return cfg.init_std / std::sqrt(2.0 * cfg.n_layer); }

// The column-parallel projections of one input (q/k/v, gate/up): in training (gradients on) one
// autograd node on CPU fp32 (cpu_linear_group: the input gradient summed in the products'
// output), each module's own forward otherwise (inference, int8 weights).
std::vector<at::Tensor> project(const at::Tensor& x, std::initializer_list<ColumnParallelLinearImpl*> projections) {
  bool group = at::GradMode::is_enabled();
  bool grad = x.requires_grad();
  std::vector<at::Tensor> weights;
  for (ColumnParallelLinearImpl* p : projections) {
    group = group && !p->is_int8();
    grad = grad || p->weight.requires_grad();
    weights.push_back(p->weight);
  }
  if (group && grad) return cpu_linear_group(x, weights);
  std::vector<at::Tensor> ys;
  for (ColumnParallelLinearImpl* p : projections) ys.push_back(p->forward(x));
  return ys;
}

}  // namespace

// ---- RMSNorm -------------------------------------------------------------------------------

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  const bool reduced = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  if (reduced && weight.scalar_type() == at::kFloat) return rms_norm_in_dtype(x, weight, eps);
  return rms_norm(x, weight, eps);  // fused on CPU and CUDA (core/model/fused_ops.h)
}

at::Tensor RMSNormImpl::forward_add_(at::Tensor& residual, const at::Tensor& delta) {
  at::Tensor y = add_rms_norm_fp32_(residual, delta, weight, eps);
  if (y.defined()) return y;
  residual = residual + delta;
  return forward(residual);
}

std::pair<at::Tensor, at::Tensor> RMSNormImpl::forward_add(const at::Tensor& residual, const at::Tensor& delta) {
  const bool reduced = residual.scalar_type() == at::kBFloat16 || residual.scalar_type() == at::kHalf;
  if (!reduced) return add_rms_norm(residual, delta, weight, eps);
  at::Tensor h = residual + delta;
  return {h, forward(h)};
}

// ---- attention -----------------------------------------------------------------------------

LlamaAttentionImpl::LlamaAttentionImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed,
                                       const std::string& p)
    : tp_(tp) {
  const int tp_size = tp_size_of(tp);
  head_dim_ = head_dim(cfg);
  n_head_local_ = cfg.n_head / tp_size;
  n_kv_head_local_ = cfg.n_kv_head / tp_size;
  auto col = [&](const char* name, int64_t out) {
    return register_module(name,
                           ColumnParallelLinear(ColumnParallelLinearOptions(cfg.dim, out, tp)
                                                    .copy_input(false)
                                                    .init_std(cfg.init_std)
                                                    .seed(param_seed(seed, p + name + ".weight"))));
  };
  q_proj = col("q_proj", cfg.n_head * head_dim_);
  k_proj = col("k_proj", cfg.n_kv_head * head_dim_);
  v_proj = col("v_proj", cfg.n_kv_head * head_dim_);
  o_proj = register_module(
      "o_proj", RowParallelLinear(RowParallelLinearOptions(cfg.n_head * head_dim_, cfg.dim, tp)
                                      .init_std(residual_std(cfg))
                                      .seed(param_seed(seed, p + "o_proj.weight"))));
}

at::Tensor LlamaAttentionImpl::forward(const at::Tensor& x, const RopeRows& rope) {
  const int64_t b = x.size(0), t = x.size(1);
  at::Tensor xc = copy_to_tp_region(x, tp_);
  const std::vector<at::Tensor> qkv = project(xc, {q_proj.get(), k_proj.get(), v_proj.get()});
  at::Tensor q = rope_bthd(qkv[0].view({b, t, n_head_local_, head_dim_}), rope.cos, rope.sin).transpose(1, 2);
  at::Tensor k = rope_bthd(qkv[1].view({b, t, n_kv_head_local_, head_dim_}), rope.cos, rope.sin).transpose(1, 2);
  at::Tensor v = qkv[2].view({b, t, n_kv_head_local_, head_dim_}).transpose(1, 2);
  at::Tensor o = attention(q, k, v, /*q_offset=*/0);
  return o_proj(o.transpose(1, 2).reshape({b, t, n_head_local_ * head_dim_}));
}

at::Tensor LlamaAttentionImpl::forward_batch(const at::Tensor& x, const RopeRows& rope,
                                             KvCache& cache, int64_t layer,
                                             const ForwardBatch& batch, const at::Tensor& slots) {
  const int64_t n = x.size(0);
  // RoPE on [1, N, H, d] views of the packed rows.
  auto rotate = [&](const at::Tensor& t, int64_t heads) {
    return rope_bthd(t.view({1, n, heads, head_dim_}), rope.cos.unsqueeze(0), rope.sin.unsqueeze(0))
        .view({n, heads, head_dim_});
  };
  at::Tensor q = rotate(q_proj(x), n_head_local_);
  at::Tensor k = rotate(k_proj(x), n_kv_head_local_);
  at::Tensor v = v_proj(x).view({n, n_kv_head_local_, head_dim_});
  write_kv_cache(cache.k(layer), cache.v(layer), slots, k, v);
  at::Tensor o = paged_attention(q, cache.k(layer), cache.v(layer), batch, cache.block_size(), k, v);
  return o_proj(o.reshape({n, n_head_local_ * head_dim_}));
}

// ---- MLP -----------------------------------------------------------------------------------

LlamaMLPImpl::LlamaMLPImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed, const std::string& p)
    : tp_(tp) {
  const int64_t ffn = derived_ffn_dim(cfg);
  auto col = [&](const char* name) {
    return register_module(name,
                           ColumnParallelLinear(ColumnParallelLinearOptions(cfg.dim, ffn, tp)
                                                    .copy_input(false)
                                                    .init_std(cfg.init_std)
                                                    .seed(param_seed(seed, p + name + ".weight"))));
  };
  gate_proj = col("gate_proj");
  up_proj = col("up_proj");
  down_proj = register_module(
      "down_proj", RowParallelLinear(RowParallelLinearOptions(ffn, cfg.dim, tp)
                                         .init_std(residual_std(cfg))
                                         .seed(param_seed(seed, p + "down_proj.weight"))));
}

at::Tensor LlamaMLPImpl::forward(const at::Tensor& x) {
  at::Tensor xc = copy_to_tp_region(x, tp_);
  const std::vector<at::Tensor> gate_up = project(xc, {gate_proj.get(), up_proj.get()});
  return down_proj(swiglu(gate_up[0], gate_up[1]));  // fused on CPU
}

// ---- decoder layer -------------------------------------------------------------------------

LlamaDecoderLayerImpl::LlamaDecoderLayerImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed,
                                             const std::string& p) {
  input_layernorm = register_module("input_layernorm", RMSNorm(cfg.dim, cfg.norm_eps));
  self_attn = register_module("self_attn", LlamaAttention(cfg, tp, seed, p + "self_attn."));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(cfg.dim, cfg.norm_eps));
  mlp = register_module("mlp", LlamaMLP(cfg, tp, seed, p + "mlp."));
}

at::Tensor LlamaDecoderLayerImpl::forward(const at::Tensor& x, const RopeRows& rope) {
  at::Tensor residual = x, pending;
  forward_residual(residual, pending, rope);
  return residual + pending;
}

void LlamaDecoderLayerImpl::forward_residual(at::Tensor& residual, at::Tensor& pending, const RopeRows& rope) {
  at::Tensor normed;
  if (pending.defined()) std::tie(residual, normed) = input_layernorm->forward_add(residual, pending);
  else normed = input_layernorm(residual);
  std::tie(residual, normed) = post_attention_layernorm->forward_add(residual, self_attn(normed, rope));
  pending = mlp(normed);
}

void LlamaDecoderLayerImpl::forward_batch(at::Tensor& residual, at::Tensor& normed, RMSNormImpl& next_norm,
                                          const RopeRows& rope, KvCache& cache, int64_t layer,
                                          const ForwardBatch& batch, const at::Tensor& slots) {
  const at::Tensor a = self_attn->forward_batch(normed, rope, cache, layer, batch, slots);
  const at::Tensor m = mlp(post_attention_layernorm->forward_add_(residual, a));
  normed = next_norm.forward_add_(residual, m);
}

// ---- decoder stack -------------------------------------------------------------------------

LlamaModelImpl::LlamaModelImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed) {
  const int tp_size = tp_size_of(tp);
  embed_tokens = register_module(
      "embed_tokens",
      VocabParallelEmbedding(
          VocabParallelEmbeddingOptions(cfg.vocab_size, padded_vocab_size(cfg, tp_size), cfg.dim, tp)
              .init_std(cfg.init_std)
              .seed(param_seed(seed, "model.embed_tokens.weight"))));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t l = 0; l < cfg.n_layer; ++l)
    layers->push_back(LlamaDecoderLayer(cfg, tp, seed, "model.layers." + std::to_string(l) + "."));
  norm = register_module("norm", RMSNorm(cfg.dim, cfg.norm_eps));
}

// ---- causal LM -----------------------------------------------------------------------------

PartitionSpecs llama_partition_specs(const ModelConfig& cfg, int tp) {
  validate_model_shapes(cfg, tp);
  const int64_t d = head_dim(cfg), ffn = derived_ffn_dim(cfg), vp = padded_vocab_size(cfg, tp);
  PartitionSpecs s;
  s["model.embed_tokens.weight"] = PartitionSpec::split(0, cfg.vocab_size, vp);
  for (int64_t l = 0; l < cfg.n_layer; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s[p + "input_layernorm.weight"] = PartitionSpec::replicate();
    s[p + "post_attention_layernorm.weight"] = PartitionSpec::replicate();
    s[p + "self_attn.q_proj.weight"] = PartitionSpec::split(0, cfg.n_head * d);
    s[p + "self_attn.k_proj.weight"] = PartitionSpec::split(0, cfg.n_kv_head * d);
    s[p + "self_attn.v_proj.weight"] = PartitionSpec::split(0, cfg.n_kv_head * d);
    s[p + "self_attn.o_proj.weight"] = PartitionSpec::split(1, cfg.n_head * d);
    s[p + "mlp.gate_proj.weight"] = PartitionSpec::split(0, ffn);
    s[p + "mlp.up_proj.weight"] = PartitionSpec::split(0, ffn);
    s[p + "mlp.down_proj.weight"] = PartitionSpec::split(1, ffn);
  }
  s["model.norm.weight"] = PartitionSpec::replicate();
  if (!cfg.tie_embeddings) s["lm_head.weight"] = PartitionSpec::split(0, cfg.vocab_size, vp);
  return s;
}

LlamaForCausalLMImpl::LlamaForCausalLMImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed)
    : cfg_(cfg), tp_(tp) {
  const int tp_size = tp_size_of(tp);
  validate_model_shapes(cfg, tp_size);
  padded_vocab_ = padded_vocab_size(cfg, tp_size);
  specs_ = llama_partition_specs(cfg, tp_size);
  model = register_module("model", LlamaModel(cfg, tp, seed));
  if (!cfg.tie_embeddings) {
    lm_head = register_module(
        "lm_head", ColumnParallelLinear(ColumnParallelLinearOptions(cfg.dim, cfg.vocab_size, tp)
                                            .padded_out_features(padded_vocab_)
                                            .init_std(cfg.init_std)
                                            .seed(param_seed(seed, "lm_head.weight"))));
  }
  rope_ = make_rope_tables(head_dim(cfg), cfg.max_seq_len, cfg.rope_theta);
  // Every registered parameter must have a spec and the other way round.
  auto named = named_parameters();
  ANDY_CHECK(named.size() == specs_.size(), "LlamaForCausalLM: ", named.size(), " parameters but ",
             specs_.size(), " partition specs");
  for (const auto& p : named)
    ANDY_CHECK(specs_.count(p.key()), "LlamaForCausalLM: parameter '", p.key(),
               "' has no partition spec");
}

int LlamaForCausalLMImpl::tp_size() const { return tp_size_of(tp_); }
int LlamaForCausalLMImpl::tp_rank() const { return tp_rank_of(tp_); }

RopeRows LlamaForCausalLMImpl::rope_rows(const at::Tensor& positions) {
  if (rope_.cos.device() != positions.device()) {
    rope_.cos = rope_.cos.to(positions.device());
    rope_.sin = rope_.sin.to(positions.device());
  }
  const auto b = positions.size(0), t = positions.size(1);
  at::Tensor flat = positions.reshape({-1});
  return {rope_.cos.index_select(0, flat).view({b, t, -1}),
          rope_.sin.index_select(0, flat).view({b, t, -1})};
}

at::Tensor LlamaForCausalLMImpl::logits_from_hidden(const at::Tensor& h) {
  if (lm_head) return lm_head(h);
  return linear_rows(copy_to_tp_region(h, tp_), model->embed_tokens->weight);
}

at::Tensor LlamaForCausalLMImpl::hidden_states(const at::Tensor& tokens) {
  ANDY_CHECK(tokens.dim() == 2, "LlamaForCausalLM: tokens must be [B, T], got ", tokens.sizes());
  ANDY_CHECK(tokens.size(1) <= cfg_.max_seq_len, "LlamaForCausalLM: ", tokens.size(1),
             " tokens exceed model.max_seq_len = ", cfg_.max_seq_len);
  const int64_t b = tokens.size(0), t = tokens.size(1);
  // Positions 0..T-1 in every row: the same cos / sin rows every step of a training run, kept.
  const at::Tensor& kept = train_rope_.cos;  // [B, T, head_dim]
  if (!(kept.defined() && kept.size(0) == b && kept.size(1) == t && kept.device() == tokens.device())) {
    at::Tensor positions = at::arange(t, tokens.options().dtype(at::kLong)).unsqueeze(0).expand({b, t});
    train_rope_ = rope_rows(positions);
  }
  const RopeRows& rope = train_rope_;
  at::Tensor h = model->embed_tokens(tokens);
  if (residual_dtype_) h = h.to(*residual_dtype_);
  at::Tensor pending;  // the last layer's MLP output, not yet added to h
  for (const auto& layer : *model->layers) layer->as<LlamaDecoderLayer>()->forward_residual(h, pending, rope);
  return pending.defined() ? model->norm->forward_add(h, pending).second : model->norm(h);
}

at::Tensor LlamaForCausalLMImpl::forward(const at::Tensor& tokens) {
  return logits_from_hidden(hidden_states(tokens));
}

at::Tensor LlamaForCausalLMImpl::loss(const at::Tensor& local_logits, const at::Tensor& targets,
                                      int64_t ignore_index) {
  return vocab_parallel_cross_entropy_mean(local_logits, targets, tp_, vocab_start(),
                                           cfg_.vocab_size, ignore_index);
}

at::Tensor LlamaForCausalLMImpl::loss_per_token(const at::Tensor& local_logits,
                                                const at::Tensor& targets, int64_t ignore_index) {
  return vocab_parallel_cross_entropy(local_logits.reshape({-1, local_logits.size(-1)}),
                                      targets.reshape({-1}), tp_, vocab_start(), cfg_.vocab_size,
                                      ignore_index);
}

at::Tensor LlamaForCausalLMImpl::forward_batch(const ForwardBatch& batch, KvCache& cache) {
  at::NoGradGuard no_grad;
  ANDY_CHECK(cache.n_layer() == cfg_.n_layer, "forward_batch: cache has ", cache.n_layer(),
             " layers, model ", cfg_.n_layer);
  batch.validate(cache.block_size(), cache.num_blocks(), cfg_.max_seq_len);
  const at::Device device = model->embed_tokens->weight.device();
  auto on_device = [&](const std::vector<int64_t>& v) {
    return at::tensor(v, at::kLong).to(device);
  };
  at::Tensor tokens = on_device(batch.tokens);
  at::Tensor positions = on_device(batch.positions());
  at::Tensor slots = on_device(batch.slot_mapping(cache.block_size()));
  RopeRows rope = rope_rows(positions.view({1, -1}));
  rope.cos = rope.cos.squeeze(0);
  rope.sin = rope.sin.squeeze(0);
  at::Tensor h = model->embed_tokens(tokens.view({1, -1})).squeeze(0);  // [N, dim]
  const int64_t n_layer = static_cast<int64_t>(model->layers->size());
  auto layer_at = [&](int64_t l) { return model->layers[l]->as<LlamaDecoderLayer>(); };
  // Each layer's last residual add is fused with the next norm: the next layer's input norm, or
  // the final norm.
  at::Tensor normed = layer_at(0)->input_layernorm(h);
  for (int64_t l = 0; l < n_layer; ++l)
    layer_at(l)->forward_batch(h, normed, l + 1 < n_layer ? *layer_at(l + 1)->input_layernorm : *model->norm, rope,
                               cache, l, batch, slots);
  // The head only for the rows that are sampled (every row of a step of decodes, in order).
  const auto& rows = batch.sample_rows;
  bool all_rows = static_cast<int64_t>(rows.size()) == normed.size(0);
  for (size_t i = 0; all_rows && i < rows.size(); ++i) all_rows = rows[i] == static_cast<int64_t>(i);
  return logits_from_hidden(all_rows ? normed : normed.index_select(0, on_device(rows)));
}

at::Tensor LlamaForCausalLMImpl::forward_cached(const at::Tensor& tokens, KvCache& cache,
                                                std::vector<KvSequence>& seqs) {
  ANDY_CHECK(tokens.dim() == 2 && tokens.size(0) == static_cast<int64_t>(seqs.size()),
             "forward_cached: tokens [B, T] with one KvSequence per row expected, got ",
             tokens.sizes(), " and ", seqs.size(), " sequences");
  const int64_t b = tokens.size(0), t = tokens.size(1);
  at::Tensor host = tokens.to(at::kCPU).to(at::kLong).contiguous();
  ForwardBatch batch;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t* row = host.data_ptr<int64_t>() + i * t;
    batch.add_sequence(std::vector<int64_t>(row, row + t), seqs[i].length + t, seqs[i].block_table);
  }
  for (int64_t r = 0; r < b * t; ++r) batch.sample_rows.push_back(r);
  at::Tensor logits = forward_batch(batch, cache);
  for (auto& s : seqs) s.length += t;
  return logits.view({b, t, -1});
}

at::Tensor LlamaForCausalLMImpl::gather_logits(const at::Tensor& local_logits) const {
  at::Tensor full = tp_active(tp_) ? gather_from_tp_region(local_logits, tp_) : local_logits;
  return full.narrow(-1, 0, cfg_.vocab_size);
}

at::Tensor LlamaForCausalLMImpl::gather_logits_to_root(const at::Tensor& local_logits) const {
  at::Tensor full = tp_active(tp_) ? gather_to_tp_root(local_logits, tp_) : local_logits;
  return full.defined() ? full.narrow(-1, 0, cfg_.vocab_size) : full;
}

std::vector<int64_t> LlamaForCausalLMImpl::greedy_tokens_to_root(const at::Tensor& local_logits) const {
  ANDY_CHECK(local_logits.dim() == 2, "greedy_tokens_to_root: [rows, vocab slice] logits expected, got ",
             local_logits.sizes());
  // The indices travel as fp32, exact below 2^24.
  ANDY_CHECK(cfg_.vocab_size <= (int64_t{1} << 24), "greedy_tokens_to_root: vocab_size ", cfg_.vocab_size,
             " above 2^24");
  const int64_t rows = local_logits.size(0), start = vocab_start();
  const int64_t valid = std::clamp<int64_t>(cfg_.vocab_size - start, 0, local_logits.size(1));  // no padding
  // 1. This rank's (largest logit, its global index) per row; NaN as the value flags a NaN.
  at::Tensor best;
  if (valid == 0) {
    best = at::full({rows, 2}, -std::numeric_limits<float>::infinity(), local_logits.options().dtype(at::kFloat));
  } else if (local_logits.is_cpu()) {
    const at::Tensor l = local_logits.narrow(1, 0, valid).to(at::kFloat).contiguous();
    best = at::empty({rows, 2}, at::kFloat);
    float* out = best.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = l.data_ptr<float>() + r * valid;
      bool nan = false;
      const int64_t i = argmax_f32(row, valid, nan);
      out[2 * r] = nan ? std::numeric_limits<float>::quiet_NaN() : row[i];
      out[2 * r + 1] = static_cast<float>(start + i);
    }
  } else {
    auto [v, i] = at::max(local_logits.narrow(1, 0, valid).to(at::kFloat), 1);  // first maximum; NaN wins
    best = at::stack({v, i.to(at::kFloat) + static_cast<double>(start)}, 1);
  }
  // 2. Rank 0: every rank's pair per row, [rows, 2 * tp] in rank order, and the largest.
  const at::Tensor all = tp_active(tp_) ? gather_to_tp_root(best, tp_) : best;
  if (!all.defined()) return {};
  const at::Tensor pairs = all.to(at::kCPU).contiguous();
  const int64_t n = pairs.size(1) / 2;
  const float* p = pairs.data_ptr<float>();
  std::vector<int64_t> tokens(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r, p += 2 * n) {
    int64_t k_best = 0;
    bool nan = false;
    for (int64_t k = 0; k < n; ++k) {
      nan |= std::isnan(p[2 * k]);
      if (p[2 * k] > p[2 * k_best]) k_best = k;
    }
    ANDY_CHECK(!nan, "sampler: logits contain NaN (row ", r, ")");
    tokens[static_cast<size_t>(r)] = static_cast<int64_t>(p[2 * k_best + 1]);
  }
  return tokens;
}

std::vector<ParamInfo> LlamaForCausalLMImpl::param_infos() {
  std::vector<ParamInfo> out;
  for (const auto& p : named_parameters()) {
    ParamInfo info;
    info.name = p.key();
    info.param = p.value();
    info.spec = specs_.at(p.key());
    info.is_norm = info.name.find("norm.weight") != std::string::npos;
    info.is_embedding = info.name == "model.embed_tokens.weight";
    out.push_back(std::move(info));
  }
  return out;
}

StateDict LlamaForCausalLMImpl::local_state_dict() {
  StateDict out;
  for (const auto& p : named_parameters()) out[p.key()] = p.value();
  return out;
}

StateDict LlamaForCausalLMImpl::local_grads() {
  StateDict out;
  for (const auto& p : named_parameters())
    out[p.key()] = p.value().grad().defined() ? p.value().grad() : at::zeros_like(p.value());
  return out;
}

void LlamaForCausalLMImpl::load_full_state_dict(const StateDict& full) {
  load_local_state_dict(split_state_dict(full, specs_, tp_rank(), tp_size()));
}

void LlamaForCausalLMImpl::load_local_state_dict(const StateDict& shard) {
  at::NoGradGuard no_grad;
  // Int8 linear weights (an `andyllm quantize` model) go to their layers' int8 path.
  std::set<std::string> int8_loaded;
  for (const auto& m : named_modules()) {
    const std::string name = m.key() + ".weight";
    auto it = shard.find(name);
    if (it == shard.end() || it->second.scalar_type() != at::kChar) continue;
    auto scale = shard.find(name + "_scale");
    ANDY_CHECK(scale != shard.end(), "load_local_state_dict: int8 '", name, "' has no scale");
    if (auto* col = m.value()->as<ColumnParallelLinearImpl>())
      col->load_int8_weight(it->second, scale->second);
    else if (auto* row = m.value()->as<RowParallelLinearImpl>())
      row->load_int8_weight(it->second, scale->second);
    else
      ANDY_THROW(Error, "load_local_state_dict: '", name, "' is int8 but not a linear layer's weight");
    int8_loaded.insert(name);
  }
  for (auto& p : named_parameters()) {
    if (int8_loaded.count(p.key())) continue;
    auto it = shard.find(p.key());
    ANDY_CHECK(it != shard.end(), "load_local_state_dict: '", p.key(), "' is missing");
    ANDY_CHECK(it->second.sizes() == p.value().sizes(), "load_local_state_dict: '", p.key(),
               "' shard ", it->second.sizes(), " does not match the parameter ", p.value().sizes());
    p.value().copy_(it->second);
  }
}

StateDict LlamaForCausalLMImpl::full_state_dict() {
  return gather_full_state_dict(local_state_dict(), specs_, tp_);
}

}  // namespace andy
