// The LLaMA decoder (Hugging Face LlamaForCausalLM numerics) on tensor-parallel layers, shared
// by training and serving. Module paths give Hugging Face tensor names:
//   model.embed_tokens.weight                        [V, dim]       split dim 0 (vocab, padded)
//   model.layers.N.input_layernorm.weight            [dim]          replicated
//   model.layers.N.self_attn.{q,k,v}_proj.weight     [heads*d, dim] split dim 0 (whole heads)
//   model.layers.N.self_attn.o_proj.weight           [dim, H*d]     split dim 1
//   model.layers.N.post_attention_layernorm.weight   [dim]          replicated
//   model.layers.N.mlp.{gate,up}_proj.weight         [ffn, dim]     split dim 0
//   model.layers.N.mlp.down_proj.weight              [dim, ffn]     split dim 1
//   model.norm.weight                                [dim]          replicated
//   lm_head.weight                                   [V, dim]       split dim 0 (absent when tied)
// Convention: forward returns this rank's slice of the logits, [B, T, padded_vocab / tp]
// (global ids tp_rank * padded_vocab / tp + j); columns >= vocab_size are padding and count as
// -inf in loss(). Initialisation: every weight is drawn whole from
// param_seed(seed, its name) and then sliced, so any TP size gives the same function.
// The TP communicator must outlive the model (null or size 1: no tensor parallelism).
// Threads: one thread at a time per model (forward, forward_batch and the collectives they
// issue); the trainer's thread in training, the engine thread in serving. Other threads never
// touch the model or its KV cache (the server's HTTP threads talk to the engine's queues).
//
//   LlamaForCausalLM model(cfg.model, grid.tp_ptr(), cfg.train.seed);
//   at::Tensor logits = model->forward(tokens);            // [B, T, V_local]
//   at::Tensor loss = model->loss(logits, targets);        // mean over targets != -100
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/config/config.h"
#include "core/model/attention.h"
#include "core/model/forward_batch.h"
#include "core/model/kv_cache.h"
#include "parallel/tp_layers.h"
#include "parallel/tp_partition.h"

namespace andy {

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  // As transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale. A bf16 / fp16 x
  // with the fp32 weight (the reduced-precision residual stream) gives x's dtype
  // (rms_norm_in_dtype: the weight cast to x's dtype).
  at::Tensor forward(const at::Tensor& x);
  // Inference: residual += delta, then forward(residual); in one pass where
  // add_rms_norm_fp32_ applies (core/model/fused_ops.h), else as the two ops (residual then
  // refers to the sum's new tensor).
  at::Tensor forward_add_(at::Tensor& residual, const at::Tensor& delta);
  // Training's residual step: {residual + delta, forward(residual + delta)}, differentiable; fused
  // (add_rms_norm, core/model/fused_ops.h) where it applies.
  std::pair<at::Tensor, at::Tensor> forward_add(const at::Tensor& residual, const at::Tensor& delta);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// Cos/sin rows for each token, [B, T, head_dim].
struct RopeRows {
  at::Tensor cos, sin;
};

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  LlamaAttentionImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed, const std::string& prefix);
  // x [B, T, dim] replicated -> [B, T, dim] replicated.
  at::Tensor forward(const at::Tensor& x, const RopeRows& rope);
  // Inference over a packed batch: x [N, dim], rope rows [N, d]; writes this layer's k, v of
  // the new tokens into their cache slots (`slots` [N]), then attends over each sequence's
  // cached tokens (paged_attention). Returns [N, dim].
  at::Tensor forward_batch(const at::Tensor& x, const RopeRows& rope, KvCache& cache,
                           int64_t layer, const ForwardBatch& batch, const at::Tensor& slots);

  ColumnParallelLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr};
  RowParallelLinear o_proj{nullptr};

 private:
  CommPtr tp_;
  int64_t n_head_local_, n_kv_head_local_, head_dim_;
};
TORCH_MODULE(LlamaAttention);

class LlamaMLPImpl : public torch::nn::Module {
 public:
  LlamaMLPImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed, const std::string& prefix);
  // down(silu(gate(x)) * up(x))
  at::Tensor forward(const at::Tensor& x);
  ColumnParallelLinear gate_proj{nullptr}, up_proj{nullptr};
  RowParallelLinear down_proj{nullptr};

 private:
  CommPtr tp_;
};
TORCH_MODULE(LlamaMLP);

class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  LlamaDecoderLayerImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed,
                        const std::string& prefix);
  at::Tensor forward(const at::Tensor& x, const RopeRows& rope);
  // forward() with each residual add fused with the norm after it (RMSNormImpl::forward_add):
  // the layer's input is residual + pending (pending undefined: residual alone); on return
  // `residual` is the stream after the attention block and `pending` the MLP's output, for the
  // next layer (or the final norm) to add. The values of forward(residual + pending).
  void forward_residual(at::Tensor& residual, at::Tensor& pending, const RopeRows& rope);
  // Inference over a packed batch (LlamaAttentionImpl::forward_batch): adds the layer's attention
  // and MLP outputs to `residual` [N, dim] in place. On entry `normed` is
  // input_layernorm(residual); on return it is next_norm(residual): the next layer's input norm
  // or the final norm, each residual add fused with the norm after it (RMSNormImpl::forward_add_).
  void forward_batch(at::Tensor& residual, at::Tensor& normed, RMSNormImpl& next_norm, const RopeRows& rope,
                     KvCache& cache, int64_t layer, const ForwardBatch& batch, const at::Tensor& slots);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

// The decoder stack ("model." in Hugging Face names): embedding, layers, final norm.
class LlamaModelImpl : public torch::nn::Module {
 public:
  LlamaModelImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed);
  VocabParallelEmbedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
};
TORCH_MODULE(LlamaModel);

// One parameter of the model, for optimizers, clipping and checkpoints.
struct ParamInfo {
  std::string name;  // Hugging Face name
  at::Tensor param;  // this rank's tensor (shares storage with the module)
  PartitionSpec spec;
  bool tp_sharded() const { return !spec.replicated(); }
  // Norm weights and the embedding (AdamW groups usually exclude them from weight decay).
  bool is_norm = false;
  bool is_embedding = false;
};

class LlamaForCausalLMImpl : public torch::nn::Module {
 public:
  // Validates shapes for tp (ConfigError), builds and initialises from `seed`.
  LlamaForCausalLMImpl(const ModelConfig& cfg, CommPtr tp, uint64_t seed);

  // tokens [B, T] int64 (T <= max_seq_len), positions 0..T-1 -> local logits [B, T, V_local].
  at::Tensor forward(const at::Tensor& tokens);
  // Last hidden state after the final norm, [B, T, dim] (replicated).
  at::Tensor hidden_states(const at::Tensor& tokens);
  // The dtype of the residual stream in forward / hidden_states: the embedding's (fp32 under
  // autocast, as PyTorch's autocast keeps it) when unset, else the embedding output is cast to
  // `t` (bf16 or fp16: llm.c's and Megatron-LM's default) and every norm and residual add stays
  // in it (precision.fp32_residual = false). The inference forward is not affected.
  void set_residual_dtype(std::optional<at::ScalarType> t) { residual_dtype_ = t; }
  // Mean cross-entropy over targets != ignore_index, from local logits (vocab-parallel: the
  // full logits are never gathered). Same value on every TP rank.
  at::Tensor loss(const at::Tensor& local_logits, const at::Tensor& targets,
                  int64_t ignore_index = -100);
  // Per-token losses [B*T] (0 where ignored), for callers that sum and count themselves.
  at::Tensor loss_per_token(const at::Tensor& local_logits, const at::Tensor& targets,
                            int64_t ignore_index = -100);

  // The inference forward (no autograd): one packed batch mixing prefills, prefill chunks and
  // decodes of different lengths (core/model/forward_batch.h). Writes the new tokens' K/V into
  // `cache` (only its tensors are used: the caller owns block allocation) and returns this
  // rank's logits of the batch's sample_rows only, [R, V_local]. Collective over TP; changes
  // no scheduling state.
  at::Tensor forward_batch(const ForwardBatch& batch, KvCache& cache);
  // forward_batch for B equal-length rows: tokens [B, T] are sequence b's new tokens at
  // positions seqs[b].length .. + T - 1, logits for every row ([B, T, V_local]). Every
  // sequence must already have room (cache.reserve); on return each seqs[b].length has grown
  // by T.
  at::Tensor forward_cached(const at::Tensor& tokens, KvCache& cache,
                            std::vector<KvSequence>& seqs);

  // Full-vocabulary logits [.., vocab_size] (all-gathered over TP, padding dropped): for
  // sampling and tests, not for training.
  at::Tensor gather_logits(const at::Tensor& local_logits) const;
  // The same on TP rank 0 only (gather_to_tp_root); undefined on the other ranks.
  at::Tensor gather_logits_to_root(const at::Tensor& local_logits) const;
  // Greedy tokens of the rows of `local_logits` ([rows, this rank's vocabulary slice]) on TP
  // rank 0, without gathering the rows: each rank reduces its slice to (largest logit, index of
  // its first occurrence), rank 0 takes the largest over the ranks and, among ties, the lowest
  // rank: the lowest index, the token an argmax over the full row gives. Rank 0 receives 8
  // bytes per row instead of 4 * vocab_size. Empty on the other ranks. Throws Error when a row
  // holds NaN.
  std::vector<int64_t> greedy_tokens_to_root(const at::Tensor& local_logits) const;

  std::vector<ParamInfo> param_infos();
  const PartitionSpecs& partition_specs() const { return specs_; }
  // name -> this rank's parameter (shares storage).
  StateDict local_state_dict();
  // name -> this rank's gradient (zeros where a parameter has none yet).
  StateDict local_grads();
  // Loads a full (Hugging Face shaped, unpadded) state dict: every name must be present.
  void load_full_state_dict(const StateDict& full);
  // Loads this rank's slices (as split_state_dict / load_model_shard give them): every
  // parameter must be present with its local shape (Error naming it otherwise). An int8 linear
  // weight with its NAME_scale (core/model/int8_weights.h) switches that layer to the int8
  // inference path (CPU, no autograd).
  void load_local_state_dict(const StateDict& shard);
  // Collective over TP: the full state dict, on every rank.
  StateDict full_state_dict();

  const ModelConfig& config() const { return cfg_; }
  int tp_size() const;
  int tp_rank() const;
  int64_t padded_vocab() const { return padded_vocab_; }
  int64_t vocab_start() const { return model->embed_tokens->vocab_start(); }

  LlamaModel model{nullptr};
  ColumnParallelLinear lm_head{nullptr};  // null when tie_embeddings

 private:
  at::Tensor logits_from_hidden(const at::Tensor& h);
  RopeRows rope_rows(const at::Tensor& positions);  // positions [B, T] -> rows

  ModelConfig cfg_;
  CommPtr tp_;
  int64_t padded_vocab_;
  RopeTables rope_;
  PartitionSpecs specs_;
  std::optional<at::ScalarType> residual_dtype_;
  RopeRows train_rope_;  // hidden_states' rows of its last [B, T] (positions 0..T-1 in each row)
};
TORCH_MODULE(LlamaForCausalLM);

// Partition specs of every parameter of the LLaMA model for `tp_size` ranks, by HF name
// (usable without building a model: checkpoint reshaping, export, the server's loader).
PartitionSpecs llama_partition_specs(const ModelConfig& cfg, int tp_size);

}  // namespace andy
