// Single-process model tests: shape checks at config time, derived sizes, parameter/FLOP
// helpers, the cross-entropy against the dense one, split/merge, and KV-cache decoding (TP=1).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <functional>
#include <map>
#include <set>

#include "core/base/error.h"
#include "core/base/torch_compat.h"
#include "core/model/llama.h"
#include "core/model/model_config.h"
#include "core/model/model_stats.h"
#include "parallel/tp_cross_entropy.h"
#include "parallel/tp_partition.h"
#include "tests/model/model_test_util.h"

using namespace andy;
using andy::test::report;
using andy::test::tiny_config;

namespace {

template <typename F>
std::string config_error_of(F f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST(ModelConfig, DerivedShapes) {
  ModelConfig m = tiny_config(true);
  EXPECT_EQ(derived_ffn_dim(m), 192);  // int(8 * 64 / 3) = 170 -> multiple of 32
  m.dim = 4096;
  m.ffn_multiple_of = 256;
  EXPECT_EQ(derived_ffn_dim(m), 11008);  // LLaMA-7B
  m.ffn_dim = 1000;
  EXPECT_EQ(derived_ffn_dim(m), 1000);
  ModelConfig v = tiny_config(true);
  EXPECT_EQ(padded_vocab_size(v, 1), 128);
  EXPECT_EQ(padded_vocab_size(v, 4), 128);
  EXPECT_EQ(padded_vocab_size(v, 3), 192);
  v.vocab_size = 32000;
  EXPECT_EQ(padded_vocab_size(v, 8), 32000);
  v.vocab_size = 32001;
  EXPECT_EQ(padded_vocab_size(v, 8), 32064);
  EXPECT_EQ(padded_vocab_size(v, 8) % 8, 0);
}

TEST(ModelConfig, InvalidShapesAreRefused) {
  struct Case {
    const char* what;
    std::function<void(ModelConfig&)> edit;
    int tp;
    const char* expect;
  };
  std::vector<Case> cases = {
      {"n_head not divisible by tp",
       [](ModelConfig& m) {
         m.n_head = 6;
         m.n_kv_head = 2;
         m.dim = 96;
       },
       4, "model.n_head = 6"},
      {"n_kv_head not divisible by tp", [](ModelConfig& m) { m.n_kv_head = 2; }, 4,
       "model.n_kv_head = 2"},
      {"n_head not a multiple of n_kv_head", [](ModelConfig& m) { m.n_kv_head = 3; }, 1,
       "not a multiple of model.n_kv_head = 3"},
      {"dim not divisible by n_head", [](ModelConfig& m) { m.dim = 60; }, 1, "model.dim = 60"},
      {"odd head size", [](ModelConfig& m) { m.dim = 72; }, 1, "odd"},
      {"ffn_dim not divisible by tp", [](ModelConfig& m) { m.ffn_dim = 190; }, 4, "ffn_dim = 190"},
  };
  for (const auto& c : cases) {
    ModelConfig m = tiny_config(true);
    c.edit(m);
    std::string msg = config_error_of([&] { validate_model_shapes(m, c.tp); });
    std::printf("  %-36s -> %s\n", c.what, msg.c_str());
    EXPECT_NE(msg.find(c.expect), std::string::npos) << c.what << ": " << msg;
    // The run config's validate_config refuses the same configurations.
    Config cfg;
    cfg.model = m;
    cfg.data.seq_len = m.max_seq_len;
    cfg.parallel.tensor_parallel_size = c.tp;
    EXPECT_THROW(validate_config(cfg, c.tp), ConfigError) << c.what;
    // And the model refuses to be built (TP=1 cases; TP>1 needs a communicator).
    if (c.tp == 1) {
      EXPECT_THROW(LlamaForCausalLM(m, nullptr, 1), ConfigError) << c.what;
    }
    EXPECT_THROW(llama_partition_specs(m, c.tp), ConfigError) << c.what;
  }
  // A vocabulary that does not divide by tp is padded, never refused.
  ModelConfig m = tiny_config(true);
  m.vocab_size = 101;
  EXPECT_NO_THROW(validate_model_shapes(m, 4));
  EXPECT_EQ(llama_partition_specs(m, 4).at("model.embed_tokens.weight").padded_size % 4, 0);
}

TEST(ModelStats, ParameterCountMatchesTheModel) {
  for (bool tie : {true, false}) {
    ModelConfig m = tiny_config(tie);
    LlamaForCausalLM model(m, nullptr, 7);
    int64_t n = 0;
    for (const auto& [name, t] : model->full_state_dict()) n += t.numel();  // unpadded
    ParamCounts c = count_parameters(m);
    std::printf("  tie=%d: count_parameters %lld, model %lld\n", tie, (long long)c.total,
                (long long)n);
    EXPECT_EQ(c.total, n);
    // 6N + 12 L H Q T, N without an untied embedding table.
    double expect = 6.0 * (c.total - (tie ? 0 : c.embedding)) + 12.0 * 2 * 8 * 8 * 16;
    EXPECT_DOUBLE_EQ(training_flops_per_token(m, 16), expect);
    MemoryEstimate e = estimate_memory(m, 1, 2, 16, "fp32");
    int64_t local = 0;
    for (const auto& p : model->parameters()) local += p.numel();
    EXPECT_DOUBLE_EQ(e.weights, 4.0 * local);
    EXPECT_DOUBLE_EQ(e.optimizer, 8.0 * local);
    EXPECT_GT(e.activations, 0.0);
    EXPECT_DOUBLE_EQ(estimate_memory(m, 1, 4, 16, "fp32").activations, 2 * e.activations);
  }
  // LLaMA-7B shapes give its well-known 6.74 B parameters.
  ModelConfig big;
  big.dim = 4096;
  big.n_layer = 32;
  big.n_head = 32;
  big.n_kv_head = 32;
  big.ffn_multiple_of = 256;
  big.vocab_size = 32000;
  big.tie_embeddings = false;
  EXPECT_EQ(count_parameters(big).total, 6738415616LL);
  Config cfg;
  cfg.model = big;
  std::string s = model_summary(cfg);
  std::printf("%s", s.c_str());
  EXPECT_NE(s.find("6.74 G"), std::string::npos);
}

TEST(ModelStats, KnownGpuPeaksByDeviceNameAndPrecision) {
  EXPECT_DOUBLE_EQ(known_gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16"), 989.4);
  EXPECT_DOUBLE_EQ(known_gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp16"), 989.4);
  EXPECT_DOUBLE_EQ(known_gpu_peak_tflops("NVIDIA H100 80GB HBM3", "fp32"), 66.9);
  EXPECT_DOUBLE_EQ(known_gpu_peak_tflops("NVIDIA H100 PCIe", "bf16"), 756.5);
  EXPECT_DOUBLE_EQ(known_gpu_peak_tflops("NVIDIA H200", "bf16"), 989.4);
  EXPECT_DOUBLE_EQ(known_gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16"), 312.0);
  EXPECT_DOUBLE_EQ(known_gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32"), 19.5);
  // Unknown rather than wrong.
  EXPECT_EQ(known_gpu_peak_tflops("Tesla V100-SXM2-32GB", "bf16"), 0);
  EXPECT_EQ(known_gpu_peak_tflops("NVIDIA GeForce RTX 4090", "bf16"), 0);
  EXPECT_EQ(known_gpu_peak_tflops("", "fp32"), 0);
}

TEST(CrossEntropy, MatchesDenseWithPaddingAndIgnoredTargets) {
  const int64_t n = 24, vocab = 100, padded = 128;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(11);
  at::Tensor logits = at::randn({n, padded}, gen).mul(3.0);
  at::Tensor targets = at::randint(vocab, {n}, gen, at::TensorOptions().dtype(at::kLong));
  targets.index_put_({at::arange(0, n, 5)}, -100);
  at::Tensor weights = at::rand({n}, gen);
  at::Tensor a = logits.clone().requires_grad_(true);
  at::Tensor loss = vocab_parallel_cross_entropy(a, targets, nullptr, 0, vocab, -100);
  (loss * weights).sum().backward();
  at::Tensor b = logits.narrow(1, 0, vocab).clone().requires_grad_(true);
  at::Tensor ref = at::cross_entropy_loss(b, targets, {}, at::Reduction::None, -100);
  (ref * weights).sum().backward();
  EXPECT_LT(report("loss vs dense cross-entropy (TP=1)", loss, ref), 1e-6);
  EXPECT_LT(report("grad vs dense cross-entropy (TP=1)", a.grad().narrow(1, 0, vocab), b.grad()),
            1e-6);
  EXPECT_EQ(andy::test::max_abs(a.grad().narrow(1, vocab, padded - vocab)), 0.0)
      << "padded columns get gradient";
  EXPECT_EQ(andy::test::max_abs(a.grad().index({at::arange(0, n, 5)})), 0.0)
      << "ignored rows get gradient";
  // The mean form divides by the number of non-ignored targets.
  at::Tensor mean = vocab_parallel_cross_entropy_mean(logits, targets, nullptr, 0, vocab, -100);
  at::Tensor ref_mean =
      at::cross_entropy_loss(logits.narrow(1, 0, vocab), targets, {}, at::Reduction::Mean, -100);
  EXPECT_LT(report("mean loss vs dense (TP=1)", mean, ref_mean), 1e-6);
}

TEST(Partition, SplitThenMergeIsIdentity) {
  for (bool tie : {true, false}) {
    ModelConfig m = tiny_config(tie, 4);
    m.vocab_size = 101;  // padding differs for every tp
    LlamaForCausalLM model(m, nullptr, 3);
    StateDict full = model->full_state_dict();
    EXPECT_EQ(full.at("model.embed_tokens.weight").size(0), 101);
    for (int tp : {1, 2, 4}) {
      PartitionSpecs specs = llama_partition_specs(m, tp);
      std::vector<StateDict> shards;
      for (int r = 0; r < tp; ++r) shards.push_back(split_state_dict(full, specs, r, tp));
      EXPECT_EQ(shards[0].at("model.layers.0.self_attn.k_proj.weight").size(0), 4 / tp * 8);
      EXPECT_EQ(shards[0].at("model.layers.1.mlp.down_proj.weight").size(1), 192 / tp);
      StateDict back = merge_state_dicts(shards, specs);
      ASSERT_EQ(back.size(), full.size());
      double worst = 0;
      for (const auto& [name, t] : full) {
        ASSERT_EQ(back.at(name).sizes(), t.sizes()) << name;
        worst = std::max(worst, andy::test::max_abs(back.at(name) - t));
      }
      std::printf("  tie=%d tp=%d: split+merge max |diff| over %zu tensors = %g\n", tie, tp,
                  full.size(), worst);
      EXPECT_EQ(worst, 0.0);
    }
  }
  // A missing tensor is named.
  ModelConfig m = tiny_config(true);
  StateDict partial;
  partial["model.norm.weight"] = at::ones({m.dim});
  EXPECT_THROW(split_state_dict(partial, llama_partition_specs(m, 2), 0, 2), Error);
}

TEST(KvCache, IncrementalDecodingMatchesFullForwardTp1) {
  for (bool tie : {true, false}) {
    ModelConfig m = tiny_config(tie, 2);
    LlamaForCausalLM model(m, nullptr, 5);
    at::Tensor tokens = andy::test::random_tokens(2, 12, m.vocab_size, 9);
    at::Tensor full;
    {
      at::NoGradGuard g;
      full = model->forward(tokens);
    }
    KvCache cache(m, 1, /*block_size=*/4, /*num_blocks=*/16);
    std::vector<KvSequence> seqs(2);
    // Prefill sequence 0 with 5 tokens and sequence 1 with 3, alone (B = 1).
    std::vector<KvSequence> one(1);
    std::vector<at::Tensor> got0, got1;
    cache.reserve(seqs[0], 5);
    one[0] = seqs[0];
    got0.push_back(model->forward_cached(tokens.narrow(0, 0, 1).narrow(1, 0, 5), cache, one));
    seqs[0] = one[0];
    cache.reserve(seqs[1], 3);
    one[0] = seqs[1];
    got1.push_back(model->forward_cached(tokens.narrow(0, 1, 1).narrow(1, 0, 3), cache, one));
    seqs[1] = one[0];
    // Decode both together one token at a time (positions differ per sequence).
    while (seqs[0].length < 12) {
      cache.reserve(seqs[0], 1);
      cache.reserve(seqs[1], 1);
      at::Tensor step =
          at::stack({tokens[0][seqs[0].length], tokens[1][seqs[1].length]}).view({2, 1});
      at::Tensor out = model->forward_cached(step, cache, seqs);
      got0.push_back(out.narrow(0, 0, 1));
      got1.push_back(out.narrow(0, 1, 1));
    }
    // Sequence 1 finishes alone with a 2-token chunk.
    cache.reserve(seqs[1], 2);
    one[0] = seqs[1];
    got1.push_back(model->forward_cached(tokens.narrow(0, 1, 1).narrow(1, 10, 2), cache, one));
    EXPECT_EQ(one[0].length, 12);
    EXPECT_NE(seqs[0].block_table, std::vector<int64_t>({0, 1, 2})) << "blocks should interleave";
    at::Tensor inc = at::stack({at::cat(got0, 1)[0], at::cat(got1, 1)[0]});
    EXPECT_LT(report(std::string("KV-cache decode vs full forward, TP=1, tie=") + (tie ? "1" : "0"),
                     inc, full),
              1e-5);
    cache.release(seqs[0]);
    cache.release(one[0]);
    EXPECT_EQ(cache.num_free_blocks(), 16);
  }
  // Running out of blocks is an error that names the counts.
  ModelConfig m = tiny_config(true);
  KvCache small(m, 1, 4, 2);
  KvSequence s;
  EXPECT_THROW(small.reserve(s, 9), Error);
  EXPECT_EQ(small.num_free_blocks(), 2);
}

TEST(Model, ParamInfosAndHuggingFaceNames) {
  ModelConfig m = tiny_config(false);
  LlamaForCausalLM model(m, nullptr, 1);
  auto infos = model->param_infos();
  std::set<std::string> names;
  for (const auto& p : infos) names.insert(p.name);
  for (const char* n :
       {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight", "model.layers.1.post_attention_layernorm.weight",
        "model.norm.weight", "lm_head.weight"})
    EXPECT_TRUE(names.count(n)) << n;
  EXPECT_EQ(infos.size(), 2 + 1 + 2 * 9u);
  for (const auto& p : infos) {
    EXPECT_EQ(p.is_norm, p.name.find("norm") != std::string::npos) << p.name;
    EXPECT_EQ(p.tp_sharded(), !p.is_norm) << p.name;
  }
  ModelConfig t = tiny_config(true);
  EXPECT_EQ(LlamaForCausalLM(t, nullptr, 1)->param_infos().size(), 1 + 1 + 2 * 9u);
}

// hidden_states keeps the RoPE rows of its last (batch, length) between calls: a call with other
// shapes in between, or on a batch of the kept shape, gives what a fresh model gives.
TEST(Model, KeptRopeRowsFollowTheBatchShape) {
  ModelConfig m = tiny_config(true, 2);
  LlamaForCausalLM model(m, nullptr, 31);
  at::NoGradGuard no_grad;
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{2, 16}, {3, 8}, {2, 16}, {1, 24}, {3, 8}};
  for (size_t i = 0; i < shapes.size(); ++i) {
    const auto [b, t] = shapes[i];
    at::Tensor tokens = andy::test::random_tokens(b, t, m.vocab_size, 40 + static_cast<int>(i));
    LlamaForCausalLM fresh(m, nullptr, 31);
    const at::Tensor want = fresh->hidden_states(tokens), got = model->hidden_states(tokens);
    EXPECT_TRUE(at::equal(got, want)) << "call " << i << " [" << b << ", " << t << "]";
  }
}

// CPU autocast to bf16 for a scope (cleared and off again at its end, an assertion failure too).
struct CpuBf16Autocast {
  CpuBf16Autocast() { compat::set_autocast(at::kCPU, true, at::kBFloat16); }
  ~CpuBf16Autocast() {
    compat::set_autocast(at::kCPU, false, at::kBFloat16);
    at::autocast::clear_cache();
  }
};

// A tiny 4-layer model with a [2, 16] batch of tokens and targets, and its fp32 loss.
struct LossCase {
  LossCase(bool tie, uint64_t seed, int token_seed)
      : m(tiny_config(tie, 4)),
        model(m, nullptr, seed),
        tokens(andy::test::random_tokens(2, 16, m.vocab_size, token_seed)),
        targets(andy::test::random_tokens(2, 16, m.vocab_size, token_seed + 1)),
        ref(model->loss(model->forward(tokens), targets)) {}
  ModelConfig m;
  LlamaForCausalLM model;
  at::Tensor tokens, targets, ref;
};

// Training will run the same model under CPU autocast to bf16: forward, loss and backward must
// work there and stay close to fp32 (bf16 has 8 bits of mantissa, so the bound is loose).
TEST(Model, Bf16AutocastForwardBackward) {
  LossCase c(false, 21, 1);
  auto& [m, model, tokens, targets, ref] = c;
  at::Tensor logits, loss;
  {
    CpuBf16Autocast bf16;
    logits = model->forward(tokens);
    loss = model->loss(logits, targets);
  }
  EXPECT_EQ(logits.scalar_type(), at::kBFloat16);
  EXPECT_EQ(loss.scalar_type(), at::kFloat);
  loss.backward();
  double rel = std::abs(loss.item<double>() - ref.item<double>()) / ref.item<double>();
  std::printf("  bf16 autocast loss %.6f vs fp32 %.6f, rel = %.3e\n", loss.item<double>(),
              ref.item<double>(), rel);
  EXPECT_LT(rel, 2e-2);
  for (const auto& p : model->param_infos()) {
    ASSERT_TRUE(p.param.grad().defined()) << p.name;
    EXPECT_EQ(p.param.grad().scalar_type(), at::kFloat) << p.name;
    EXPECT_TRUE(p.param.grad().isfinite().all().item<bool>()) << p.name;
  }
}

// precision.fp32_residual = false: the residual stream in bf16 (embedding output, adds, norms).
// The hidden states come out in bf16, the loss stays close to fp32's and to the fp32-residual
// autocast run, and every parameter (fp32 master) gets a finite fp32 gradient close to fp32's.
TEST(Model, Bf16ResidualStreamForwardBackward) {
  LossCase c(true, 23, 3);
  auto& [m, model, tokens, targets, ref] = c;
  ref.backward();
  std::map<std::string, at::Tensor> ref_grads;
  for (const auto& p : model->param_infos()) ref_grads[p.name] = p.param.grad().clone();
  model->zero_grad();
  model->set_residual_dtype(at::kBFloat16);
  at::Tensor hidden, loss;
  {
    CpuBf16Autocast bf16;
    hidden = model->hidden_states(tokens);
    loss = model->loss(model->forward(tokens), targets);
  }
  model->set_residual_dtype(std::nullopt);
  EXPECT_EQ(hidden.scalar_type(), at::kBFloat16);
  loss.backward();
  const double rel = std::abs(loss.item<double>() - ref.item<double>()) / ref.item<double>();
  std::printf("  bf16 residual loss %.6f vs fp32 %.6f, rel = %.3e\n", loss.item<double>(), ref.item<double>(), rel);
  EXPECT_LT(rel, 2e-2);
  for (const auto& p : model->param_infos()) {
    ASSERT_TRUE(p.param.grad().defined()) << p.name;
    EXPECT_EQ(p.param.grad().scalar_type(), at::kFloat) << p.name;
    const at::Tensor& g = ref_grads.at(p.name);
    const double err = (p.param.grad() - g).norm().item<double>() / (g.norm().item<double>() + 1e-12);
    EXPECT_LT(err, 0.1) << p.name;
  }
  // Unset again: the fp32 residual stream of autocast's default.
  CpuBf16Autocast bf16;
  EXPECT_EQ(model->hidden_states(tokens).scalar_type(), at::kFloat);
}
