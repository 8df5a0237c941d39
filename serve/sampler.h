// Token sampling for the serving engine (rank 0 only). One SequenceSampler per generated
// sequence owns that sequence's random generator, so a seeded request draws the same tokens
// whatever else shares the batch. Logits processing order (as vLLM's): logit_bias, then
// repetition / presence / frequency penalties, then (unless greedy) temperature, top_k, top_p,
// min_p, then a draw. Logprobs are taken from the raw model logits (log_softmax before any
// processing), as vLLM reports them by default.
// Not thread-safe: the engine thread owns every sampler.
//
//   SamplingParams p; p.temperature = 0.8; p.top_p = 0.95; p.seed = 7;
//   SequenceSampler s(p, /*seed=*/7);
//   SampledToken t = s.sample(logits_row, prompt_ids, output_ids);
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

namespace andy::serve {

struct SamplingParams {
  int64_t max_tokens = 16;          // tokens to generate at most. Default: 16
  double temperature = 1.0;         // 0: greedy (argmax). Default: 1
  double top_p = 1.0;               // nucleus mass kept, (0, 1]. Default: 1 (off)
  int64_t top_k = 0;                // keep the k most likely; 0 or -1: off. Default: 0
  double min_p = 0.0;               // drop tokens below min_p x the top probability. Default: 0
  int64_t seed = -1;                // -1: drawn by the engine. Default: -1
  double presence_penalty = 0.0;    // OpenAI: minus this for every token already generated
  double frequency_penalty = 0.0;   // OpenAI: minus this x count of the token in the output
  double repetition_penalty = 1.0;  // CTRL/HF: logits of prompt+output tokens divided (>0) or
                                    // multiplied (<0) by it. Default: 1 (off)
  std::map<int32_t, double> logit_bias;  // token id -> added to its logit
  std::vector<int32_t> stop_token_ids;   // stop after generating one of these (kept in output)
  bool ignore_eos = false;               // do not stop at the tokenizer's eos
  int64_t n = 1;                         // completions of the same prompt. Default: 1
  int64_t logprobs = -1;                 // -1: none; k >= 0: the chosen token's logprob and the
                                         // k most likely alternatives
  int64_t prompt_logprobs = -1;          // -1: none; k >= 0: the same for every prompt token after
                                         // the first (vLLM's prompt_logprobs; echo + logprobs)
  // Checks ranges; returns "" or a message naming the field and the range, e.g.
  // "temperature = -1: expected 0 <= temperature <= 100".
  std::string validate(int64_t vocab_size) const;
};

// Whether sampling under `p` is a bare argmax of the raw logits: greedy, with no logprobs, logit
// bias or penalty (the engine then reduces each row on the TP ranks, greedy_tokens_to_root).
bool is_plain_greedy(const SamplingParams& p);

struct SampledToken {
  int32_t token = 0;
  double logprob = 0;  // log-probability of `token` under the raw model distribution
                       // (filled when params.logprobs >= 0, else 0)
  std::vector<std::pair<int32_t, double>> top;  // the `logprobs` most likely (id, logprob)
};

// `token` scored under the raw distribution of `logits` ([vocab] fp32 CPU): its logprob and the
// k most likely alternatives (what sample() reports, for a token that was given, not drawn).
SampledToken score_token(const at::Tensor& logits, int32_t token, int64_t k);

class SequenceSampler {
 public:
  SequenceSampler(const SamplingParams& params, uint64_t seed);
  // logits: [vocab] fp32 CPU, the full vocabulary of this step's row (not modified).
  // prompt / output: the sequence's tokens so far, for the penalties.
  SampledToken sample(const at::Tensor& logits, const std::vector<int32_t>& prompt,
                      const std::vector<int32_t>& output);
  const SamplingParams& params() const { return params_; }

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace andy::serve
