// The inference engine on real ranks (ctest: mpirun -np 1, 2 and 4; the world is one TP group).
// The independent reference is greedy decoding with the dense TP=1 model's full forward (no KV
// cache, the whole sequence every token), built from the same seed on every rank. Checked:
// the packed batched forward against the full forward's logits; greedy tokens served alone,
// in a batch of 32 mixed-length requests with small prefill chunks (through packed weights, as
// `generate` and `serve` run on CPU), under KV-pool pressure
// (preemption by recompute, and by swapping), with a prefix-cache hit; seeded sampling alone
// vs in a batch; n > 1; every KV block free after the requests end; RSS flat over 1,000
// requests.
#include <gtest/gtest.h>
#include <mpi.h>
#include <torch/torch.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include "core/model/llama.h"
#include "parallel/cpu_gemm.h"
#include "parallel/mpi_communicator.h"
#include "serve/engine.h"
#include "tests/model/model_test_util.h"

using namespace andy;
using namespace andy::serve;

namespace {

constexpr uint64_t kSeed = 4321;

CommPtr world_tp() {
  // Deliberately leaked: it must not be destroyed after MPI_Finalize (at static destruction).
  static CommPtr* comm = new CommPtr(std::make_shared<MpiCommunicator>(
      MpiComm(MPI_COMM_WORLD, false), "tp[test]", std::chrono::milliseconds(120000)));
  return *comm;
}
ControlChannel& channel() {
  static ControlChannel* ch = new ControlChannel(MPI_COMM_WORLD);
  return *ch;
}
int rank() { return world_tp()->rank(); }

ModelConfig model_config() {
  ModelConfig m = test::tiny_config(/*tie=*/false);
  m.dim = 128;  // head size 16, two query heads per kv head: the CPU decode kernel's AVX2 path
  m.max_seq_len = 96;
  m.init_std = 0.3;  // peaked logits: greedy choices far from ties
  return m;
}

LlamaForCausalLM& tp_model() {
  static LlamaForCausalLM* m = new LlamaForCausalLM(model_config(), world_tp(), kSeed);
  return *m;
}
LlamaForCausalLM& dense_model() {
  static LlamaForCausalLM* m = new LlamaForCausalLM(model_config(), nullptr, kSeed);
  return *m;
}

// Greedy continuation by full forwards of the dense model (the reference).
std::vector<int32_t> reference_greedy(const std::vector<int32_t>& prompt, int64_t max_tokens) {
  at::NoGradGuard no_grad;
  std::vector<int64_t> seq(prompt.begin(), prompt.end());
  std::vector<int32_t> out;
  for (int64_t i = 0; i < max_tokens; ++i) {
    at::Tensor logits = dense_model()->forward(at::tensor(seq, at::kLong).view({1, -1}));
    int64_t next = dense_model()->gather_logits(logits)[0][-1].argmax().item<int64_t>();
    out.push_back(static_cast<int32_t>(next));
    seq.push_back(next);
  }
  return out;
}

EngineOptions options(int64_t num_blocks = 64, int64_t block_size = 8) {
  EngineOptions o;
  o.block_size = block_size;
  o.num_blocks = num_blocks;
  o.max_num_seqs = 32;
  o.max_num_batched_tokens = 64;
  o.max_model_len = 96;
  o.eos_id = -1;  // random model: run to max_tokens
  return o;
}

struct Outcome {
  std::map<int64_t, std::vector<std::vector<int32_t>>> tokens;  // request index -> completions
  std::map<int64_t, std::string> errors;
  std::map<int64_t, int64_t> cached;
  std::map<int64_t, std::vector<SampledToken>> prompt_logprobs;
  EngineStats stats;
};

// Runs `requests` on a fresh engine; `together`: all submitted at once, else one at a time.
// Collective: workers follow rank 0's plans. Checks every KV block is free at the end.
Outcome run(const EngineOptions& opts, const std::vector<GenerationRequest>& requests, bool together,
            at::ScalarType kv_dtype = at::kFloat, LlamaForCausalLM* model = nullptr) {
  Engine engine(opts, model ? *model : tp_model(), at::TensorOptions().dtype(kv_dtype), &channel());
  Outcome out;
  if (rank() != 0) {
    engine.run_worker();
    return out;
  }
  auto submit = [&](size_t i) {
    out.tokens[i].resize(requests[i].params.n);
    engine.submit(requests[i], [&out, i](const RequestUpdate& u) {
      if (!u.error.empty()) out.errors[i] = u.error;
      auto& t = out.tokens[i][u.index];
      t.insert(t.end(), u.new_tokens.begin(), u.new_tokens.end());
      if (u.finished) out.cached[i] = u.cached_prompt_tokens;
      if (!u.prompt_logprobs.empty()) out.prompt_logprobs[i] = u.prompt_logprobs;
    });
  };
  for (size_t i = 0; i < requests.size(); ++i) {
    submit(i);
    if (!together) engine.run_until_idle();
  }
  engine.run_until_idle();
  out.stats = engine.stats();
  EXPECT_EQ(engine.num_free_blocks(), opts.num_blocks) << "KV blocks still held after every request ended";
  EXPECT_EQ(out.stats.kv_blocks_used, 0);
  engine.shutdown_workers();
  return out;
}

// run() with the products through packed weights, as `generate` and `serve` run on CPU
// (serve.cpu_packed_weights); checks that packs were made where this LibTorch has the functions.
Outcome run_packed(const EngineOptions& opts, const std::vector<GenerationRequest>& requests, bool together,
                   at::ScalarType kv_dtype = at::kFloat, LlamaForCausalLM* model = nullptr) {
  set_cpu_packed_weights(true);
  Outcome out = run(opts, requests, together, kv_dtype, model);
  const at::ScalarType dtype = (model ? *model : tp_model())->model->embed_tokens->weight.scalar_type();
  if (cpu_packed_weights_available(dtype)) {
    EXPECT_GT(cpu_packed_weight_bytes(), 0);
  }
  set_cpu_packed_weights(false);
  return out;
}

GenerationRequest greedy(std::vector<int32_t> prompt, int64_t max_tokens) {
  GenerationRequest r;
  r.prompt = std::move(prompt);
  r.params.temperature = 0;
  r.params.max_tokens = max_tokens;
  return r;
}

// 32 requests: prompts of 1..47 tokens, 3..18 new tokens.
std::vector<GenerationRequest> mixed_requests(int n = 32) {
  std::mt19937 rng(7);
  std::vector<GenerationRequest> out;
  for (int i = 0; i < n; ++i) {
    std::vector<int32_t> prompt(1 + (i * 13) % 47);
    for (auto& t : prompt) t = static_cast<int32_t>(rng() % 100);
    out.push_back(greedy(prompt, 3 + (i * 7) % 16));
  }
  return out;
}

std::string tag() {
  return "[tp " + std::to_string(world_tp()->size()) + "] ";
}

TEST(ForwardBatch, MixedPrefillChunkAndDecodeMatchFullForward) {
  at::NoGradGuard no_grad;
  const ModelConfig m = model_config();
  KvCache cache(m, world_tp()->size(), /*block_size=*/4, /*num_blocks=*/32);
  at::Tensor a = test::random_tokens(1, 11, 100, 1), b = test::random_tokens(1, 9, 100, 2),
             c = test::random_tokens(1, 6, 100, 3);
  auto ids = [](const at::Tensor& t, int64_t from, int64_t n) {
    std::vector<int64_t> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = t[0][from + i].item<int64_t>();
    return v;
  };
  // Step 1: b's first 5 tokens (a chunk) and c's first 5 (its prompt but one).
  ForwardBatch s1;
  s1.add_sequence(ids(b, 0, 5), 5, {0, 1, 2});
  s1.add_sequence(ids(c, 0, 5), 5, {3, 4});
  s1.sample_last_rows();
  tp_model()->forward_batch(s1, cache);
  // Step 2: a whole prompt (11 tokens), b's next chunk (4), c's decode at position 5; logits
  // for every row.
  ForwardBatch s2;
  s2.add_sequence(ids(a, 0, 11), 11, {5, 6, 7});
  s2.add_sequence(ids(b, 5, 4), 9, {0, 1, 2});
  s2.add_sequence(ids(c, 5, 1), 6, {3, 4});
  for (int64_t r = 0; r < s2.num_tokens(); ++r) s2.sample_rows.push_back(r);
  at::Tensor got = tp_model()->gather_logits(tp_model()->forward_batch(s2, cache));
  auto full = [&](const at::Tensor& t, int64_t from, int64_t n) {
    return dense_model()->gather_logits(dense_model()->forward(t))[0].narrow(0, from, n);
  };
  at::Tensor want = at::cat({full(a, 0, 11), full(b, 5, 4), full(c, 5, 1)}, 0);
  double rel = test::rel_err(got, want);
  if (rank() == 0) test::report(tag() + "packed batch vs full forward (16 rows)", got, want);
  EXPECT_LT(rel, 1e-5);
}

// With packed weights in panels (serving on an AVX-512 CPU) a decode row's logits are the same
// bits whether the sequence steps alone or in a batch: every product, norm, attention and
// all-reduce of the step is row by row (cpu_fp32_panels_on). Two caches filled by the same
// prefill; then one step of three decodes against three steps of one.
TEST(ForwardBatch, DecodeRowsAreTheSameBitsAloneAndInABatchWithPanels) {
  at::NoGradGuard no_grad;
  set_cpu_packed_weights(true);
  struct Off {
    ~Off() { set_cpu_packed_weights(false); }
  } off;
  if (!cpu_fp32_panels_on()) GTEST_SKIP() << "no panel kernel on this CPU (AVX-512)";
  const ModelConfig m = model_config();
  KvCache batched(m, world_tp()->size(), /*block_size=*/4, /*num_blocks=*/16),
      alone(m, world_tp()->size(), /*block_size=*/4, /*num_blocks=*/16);
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 9, 44, 2, 8}, {61, 7, 7}, {90, 1, 33, 4, 12}};
  const std::vector<std::vector<int64_t>> tables = {{0, 1, 2}, {3, 4}, {5, 6}};
  ForwardBatch prefill;
  for (size_t i = 0; i < prompts.size(); ++i)
    prefill.add_sequence(prompts[i], static_cast<int64_t>(prompts[i].size()), tables[i]);
  prefill.sample_last_rows();
  tp_model()->forward_batch(prefill, batched);
  tp_model()->forward_batch(prefill, alone);
  const std::vector<int64_t> next = {11, 23, 35};
  ForwardBatch step;
  for (size_t i = 0; i < prompts.size(); ++i)
    step.add_sequence({next[i]}, static_cast<int64_t>(prompts[i].size()) + 1, tables[i]);
  step.sample_last_rows();
  const at::Tensor together = tp_model()->forward_batch(step, batched);
  for (size_t i = 0; i < prompts.size(); ++i) {
    ForwardBatch one;
    one.add_sequence({next[i]}, static_cast<int64_t>(prompts[i].size()) + 1, tables[i]);
    one.sample_last_rows();
    const at::Tensor got = tp_model()->forward_batch(one, alone);
    EXPECT_TRUE(at::equal(got[0], together[static_cast<int64_t>(i)])) << tag() << "sequence " << i;
  }
}

TEST(Engine, GreedyAloneEqualsBatchedChunkedAndTheFullForwardReference) {
  auto requests = mixed_requests();
  EngineOptions o = options(/*num_blocks=*/256);
  Outcome alone = run(o, requests, /*together=*/false);
  o.max_num_batched_tokens = 16;  // prefills in chunks of at most 16 tokens, mixed with decodes
  Outcome batched = run_packed(o, requests, /*together=*/true);
  if (rank() != 0) return;
  int mismatches = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    auto want = reference_greedy(requests[i].prompt, requests[i].params.max_tokens);
    EXPECT_EQ(alone.tokens[i][0], want) << tag() << "request " << i << " alone";
    EXPECT_EQ(batched.tokens[i][0], want) << tag() << "request " << i << " in the batch";
    mismatches += alone.tokens[i][0] != want || batched.tokens[i][0] != want;
  }
  std::printf("  %s32 requests: alone %lld steps, batched %lld steps; %d mismatches vs the reference\n",
              tag().c_str(), (long long)alone.stats.steps, (long long)batched.stats.steps, mismatches);
  EXPECT_LT(batched.stats.steps, alone.stats.steps / 3) << "continuous batching should share steps";
}

// The dense model's logits for the token after `seq` (full forward, fp32).
at::Tensor reference_next_logits(const std::vector<int64_t>& seq) {
  at::NoGradGuard no_grad;
  at::Tensor logits = dense_model()->forward(at::tensor(seq, at::kLong).view({1, -1}));
  return dense_model()->gather_logits(logits)[0][-1];
}

// How far the greedy tokens `got` stray from the fp32 full forward's: the number of requests that
// differ anywhere, and the largest gap, at the first differing token, between the fp32 logits of
// the reference's choice and of ours, as a share of that row's logit range (0 at an exact tie).
std::pair<int, double> divergence(const std::vector<GenerationRequest>& requests, Outcome& out) {
  int mismatches = 0;
  double worst = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const auto want = reference_greedy(requests[i].prompt, requests[i].params.max_tokens);
    const auto& got = out.tokens[i][0];
    EXPECT_EQ(got.size(), want.size()) << "request " << i;
    if (got.size() != want.size()) {
      ++mismatches;
      continue;
    }
    size_t j = 0;
    while (j < got.size() && got[j] == want[j]) ++j;
    if (j == got.size()) continue;
    ++mismatches;
    std::vector<int64_t> seq(requests[i].prompt.begin(), requests[i].prompt.end());
    seq.insert(seq.end(), want.begin(), want.begin() + static_cast<std::ptrdiff_t>(j));
    at::Tensor l = reference_next_logits(seq);
    worst = std::max(worst, (l[want[j]] - l[got[j]]).item<double>() / (l.max() - l.min()).item<double>());
  }
  return {mismatches, worst};
}

// serve.kv_cache_dtype = fp16 / bf16: keys and values are rounded when stored. The tokens are
// the same alone as in a batch with chunked prefills and preemption by swapping; against the
// fp32 full forward, fp16 (11 significant bits) keeps every token of this model, and where bf16
// (8 bits) picks another token, the fp32 logits of the two were nearly tied there.
TEST(Engine, NarrowKvCacheKeepsGreedyTokensAloneAndBatched) {
  auto requests = mixed_requests();
  for (const at::ScalarType dtype : {at::kHalf, at::kBFloat16}) {
    EngineOptions o = options(/*num_blocks=*/256);
    Outcome alone = run(o, requests, /*together=*/false, dtype);
    o.max_num_batched_tokens = 16;
    o.num_blocks = 24;  // pressure: preemption, here by swapping to host blocks
    o.num_host_blocks = 64;
    Outcome batched = run(o, requests, /*together=*/true, dtype);
    if (rank() != 0) continue;
    EXPECT_GT(batched.stats.swapped_out_blocks, 0) << dtype;
    for (size_t i = 0; i < requests.size(); ++i)
      EXPECT_EQ(batched.tokens[i][0], alone.tokens[i][0]) << tag() << dtype << " request " << i;
    const auto [mismatches, worst_gap] = divergence(requests, alone);
    std::printf("  %s%s KV cache: %d of 32 requests differ from the fp32 full forward (largest fp32 logit gap "
                "at a divergence: %.4f of the logit range); %lld preemptions\n",
                tag().c_str(), c10::toString(dtype), mismatches, worst_gap, (long long)batched.stats.num_preemptions);
    if (dtype == at::kHalf) {
      EXPECT_EQ(mismatches, 0);
    }
    EXPECT_LT(mismatches, 8) << dtype;
    EXPECT_LT(worst_gap, 0.01) << dtype << ": a token far from a tie changed";
  }
}

// serve.dtype = bf16: the model's weights and activations in bf16 (here with a bf16 KV cache, as
// `auto` gives). Rounding to 8 significant bits moves the logits, so the greedy tokens follow the
// fp32 full forward except where its two best logits are close, alone and in a batch with chunked
// prefills (whose products run through other kernels than one row's: here oneDNN's packed bf16
// GEMM, as `generate` and `serve` run them).
TEST(Engine, Bf16ModelFollowsTheFp32ReferenceExceptNearTies) {
  static LlamaForCausalLM* bf16 = [] {
    auto* m = new LlamaForCausalLM(model_config(), world_tp(), kSeed);
    (*m)->to(at::kBFloat16);
    return m;
  }();
  auto requests = mixed_requests();
  EngineOptions o = options(/*num_blocks=*/256);
  Outcome alone = run(o, requests, /*together=*/false, at::kBFloat16, bf16);
  o.max_num_batched_tokens = 16;
  Outcome batched = run_packed(o, requests, /*together=*/true, at::kBFloat16, bf16);  // packed bf16 weights
  if (rank() != 0) return;
  for (auto* out : {&alone, &batched}) {
    const auto [mismatches, gap] = divergence(requests, *out);
    std::printf("  %sbf16 model, %s: %d of 32 requests differ from the fp32 full forward (largest fp32 logit "
                "gap at a divergence: %.4f of the logit range)\n",
                tag().c_str(), out == &alone ? "alone" : "batched", mismatches, gap);
    EXPECT_LT(mismatches, 16);
    EXPECT_LT(gap, 0.05) << "a token far from a tie changed";
  }
}

TEST(Engine, KvPoolPressurePreemptsAndKeepsGreedyTokens) {
  std::vector<GenerationRequest> requests;
  std::mt19937 rng(11);
  for (int i = 0; i < 8; ++i) {
    std::vector<int32_t> prompt(20 + i);
    for (auto& t : prompt) t = static_cast<int32_t>(rng() % 100);
    requests.push_back(greedy(prompt, 40));
  }
  // 8 sequences of ~65 tokens need ~70 blocks of 8; the pool has 24 (one sequence needs 12).
  for (bool swap : {false, true}) {
    EngineOptions o = options(/*num_blocks=*/24);
    if (swap) o.num_host_blocks = 64;
    Outcome r = run(o, requests, /*together=*/true);
    if (rank() != 0) continue;
    EXPECT_GT(r.stats.num_preemptions, 0) << "the pool was meant to be too small";
    if (swap) {
      EXPECT_GT(r.stats.swapped_out_blocks, 0) << "swap space was given: preemption should swap";
    } else {
      EXPECT_EQ(r.stats.swapped_out_blocks, 0);
    }
    for (size_t i = 0; i < requests.size(); ++i)
      EXPECT_EQ(r.tokens[i][0], reference_greedy(requests[i].prompt, 40))
          << tag() << (swap ? "swap" : "recompute") << ", request " << i;
    std::printf("  %s%s: %lld preemptions, %lld blocks swapped out, peak %lld of 24 blocks, %lld steps\n",
                tag().c_str(), swap ? "preemption by swapping" : "preemption by recompute",
                (long long)r.stats.num_preemptions, (long long)r.stats.swapped_out_blocks,
                (long long)r.stats.kv_blocks_used_peak, (long long)r.stats.steps);
  }
}

// Prompt logprobs (echo + logprobs): every prompt token after the first, scored by the engine's
// chunked prefill (70 tokens in chunks of at most 64), equal the dense model's full-forward
// log_softmax, with the same top alternatives; the prompt is in the prefix cache from an earlier
// request, which must not cut positions out of the scoring.
TEST(Engine, PromptLogprobsEqualTheFullForwardEvenWithThePrefixCached) {
  std::vector<int32_t> prompt(70);
  for (size_t i = 0; i < prompt.size(); ++i) prompt[i] = static_cast<int32_t>((i * 37 + 11) % 100);
  GenerationRequest scored = greedy(prompt, 3);
  scored.params.prompt_logprobs = 2;
  Outcome r = run(options(), {greedy(prompt, 2), scored}, /*together=*/false);
  if (rank() != 0) return;
  ASSERT_EQ(r.prompt_logprobs[1].size(), prompt.size() - 1);
  EXPECT_EQ(r.cached[1], 0) << "prompt logprobs need every position computed";
  at::Tensor logits = dense_model()->gather_logits(dense_model()->forward(at::tensor(prompt, at::kLong).view({1, -1})))[0];
  at::Tensor ref = at::log_softmax(logits.to(at::kDouble), -1);
  double worst = 0;
  for (size_t p = 0; p + 1 < prompt.size(); ++p) {
    const SampledToken& t = r.prompt_logprobs[1][p];
    EXPECT_EQ(t.token, prompt[p + 1]);
    worst = std::max(worst, std::abs(t.logprob - ref[p][prompt[p + 1]].item<double>()));
    ASSERT_EQ(t.top.size(), 2u);
    auto top = std::get<1>(ref[p].topk(2));
    EXPECT_EQ(t.top[0].first, top[0].item<int64_t>()) << "position " << p;
    EXPECT_EQ(t.top[1].first, top[1].item<int64_t>()) << "position " << p;
  }
  EXPECT_LT(worst, 1e-4);
  EXPECT_EQ(r.tokens[1][0], reference_greedy(prompt, 3));
  std::printf("  %sprompt logprobs: %zu positions, largest difference to the full forward %.2e\n", tag().c_str(),
              r.prompt_logprobs[1].size(), worst);
}

TEST(Engine, PrefixCacheComputesOnlyTheNewTokens) {
  std::vector<int32_t> shared(35);
  for (size_t i = 0; i < shared.size(); ++i) shared[i] = static_cast<int32_t>((i * 31 + 5) % 100);
  std::vector<int32_t> second = shared;
  second.insert(second.end(), {7, 8, 9, 10, 11});
  std::vector<GenerationRequest> requests = {greedy(shared, 6), greedy(second, 6)};
  Outcome r = run(options(), requests, /*together=*/false);  // one after the other
  if (rank() != 0) return;
  // Block size 8: the 4 full blocks of the shared 35 tokens (32 tokens) are found.
  EXPECT_EQ(r.cached[1], 32);
  EXPECT_EQ(r.stats.prompt_tokens, 35 + (40 - 32)) << "the second prompt computed only its last 8 tokens";
  EXPECT_GE(r.stats.prefix_hits_tokens, 32);
  EXPECT_EQ(r.tokens[1][0], reference_greedy(second, 6));
  std::printf("  %sprefix cache: %lld of %lld prompt tokens found; prompt tokens computed %lld\n",
              tag().c_str(), (long long)r.cached[1], (long long)second.size(), (long long)r.stats.prompt_tokens);
}

TEST(Engine, SeededSamplingIsTheSameAloneAndInABatchAndNGivesSeveralCompletions) {
  GenerationRequest sampled = greedy({5, 6, 7, 8, 9}, 12);
  sampled.params.temperature = 1.0;
  sampled.params.top_p = 0.95;
  sampled.params.seed = 77;
  GenerationRequest three = sampled;
  three.params.n = 3;
  three.params.seed = 5;
  std::vector<GenerationRequest> batch = mixed_requests(12);
  batch.insert(batch.begin() + 5, sampled);
  batch.push_back(three);
  Outcome alone = run(options(256), {sampled, three}, /*together=*/false);
  Outcome together = run(options(256), batch, /*together=*/true);
  if (rank() != 0) return;
  EXPECT_EQ(alone.tokens[0][0], together.tokens[5][0]) << "seeded sampling must not depend on the batch";
  ASSERT_EQ(together.tokens[13].size(), 3u);
  for (int k = 0; k < 3; ++k) {
    EXPECT_EQ(together.tokens[13][k].size(), 12u);
    EXPECT_EQ(together.tokens[13][k], alone.tokens[1][k]) << "completion " << k;
  }
  EXPECT_TRUE(together.tokens[13][0] != together.tokens[13][1] || together.tokens[13][1] != together.tokens[13][2])
      << "three sampled completions should not all be equal";
}

TEST(Engine, BadRequestsAreRefusedWithAReasonAndTheEngineGoesOn) {
  GenerationRequest too_long = greedy(std::vector<int32_t>(90, 1), 10);  // 100 > 96
  GenerationRequest bad_id = greedy({1, 2, 500}, 3);
  GenerationRequest bad_param = greedy({1, 2}, 3);
  bad_param.params.temperature = -1;
  Outcome r = run(options(), {too_long, bad_id, greedy({3, 4}, 4), bad_param}, /*together=*/true);
  if (rank() != 0) return;
  EXPECT_NE(r.errors[0].find("maximum context length is 96 tokens. However, you requested 100 tokens (90 in the messages, 10 in the completion)"),
            std::string::npos) << r.errors[0];
  EXPECT_NE(r.errors[1].find("token id 500"), std::string::npos) << r.errors[1];
  EXPECT_NE(r.errors[3].find("temperature = -1"), std::string::npos) << r.errors[3];
  EXPECT_EQ(r.tokens[2][0], reference_greedy({3, 4}, 4));
}

// An idle engine must not hit the collective timeout: workers wait for the next plan on the
// control channel (no timeout), not in a tensor-parallel collective. Here the TP communicator
// times out after 1 s and rank 0 stays idle for 2.5 s before the first request.
TEST(Engine, IdleLongerThanTheCollectiveTimeoutIsFine) {
  static CommPtr* short_tp = new CommPtr(std::make_shared<MpiCommunicator>(
      MpiComm(MPI_COMM_WORLD, false).dup(), "tp[1s]", std::chrono::milliseconds(1000)));
  LlamaForCausalLM model(model_config(), *short_tp, kSeed);
  Engine engine(options(), model, at::TensorOptions().dtype(at::kFloat), &channel());
  if (rank() != 0) {
    EXPECT_EQ(engine.run_worker(), 0);
    return;
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  std::vector<int32_t> got;
  engine.submit(greedy({9, 8, 7}, 5), [&](const RequestUpdate& u) {
    got.insert(got.end(), u.new_tokens.begin(), u.new_tokens.end());
  });
  engine.run_until_idle();
  EXPECT_EQ(got, reference_greedy({9, 8, 7}, 5));
  engine.shutdown_workers();
}

long rss_kib() {
  std::ifstream f("/proc/self/statm");
  long pages = 0, resident = 0;
  f >> pages >> resident;
  return resident * 4;
}

TEST(Engine, ResidentMemoryIsFlatOverAThousandRequests) {
  Engine engine(options(256), tp_model(), at::TensorOptions().dtype(at::kFloat), &channel());
  if (rank() != 0) {
    engine.run_worker();
    return;
  }
  long after_warmup = 0;
  for (int i = 0; i < 1000; ++i) {
    engine.submit(greedy({static_cast<int32_t>(i % 100), 4, 5}, 4), [](const RequestUpdate&) {});
    if (i % 50 == 49) engine.run_until_idle();
    if (i == 199) after_warmup = rss_kib();
  }
  engine.run_until_idle();
  const long end = rss_kib();
  std::printf("  %sRSS after 200 requests %ld KiB, after 1000 %ld KiB\n", tag().c_str(), after_warmup, end);
  EXPECT_LT(end - after_warmup, 8 * 1024) << "memory grows with the number of requests served";
  EXPECT_EQ(engine.num_free_blocks(), 256);
  EXPECT_EQ(engine.stats().requests_finished, 1000);
  engine.shutdown_workers();
}

}  // namespace
