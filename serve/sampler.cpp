// Token sampling: SamplingParams::validate and SequenceSampler::sample.
// Convention: sample() works on a double copy of the fp32 logits row (the input tensor is never
// modified); the filters (top_k, top_p, min_p) zero the weights of dropped tokens, and the draw
// is one inverse-CDF pass over the weights in token-id order, fed by the top 53 bits of one
// draw of the sequence's own mt19937_64 (not std::uniform_real_distribution, whose output
// differs between standard libraries). The O(vocab) exponentials, sums and maxima run as ATen's
// vectorised kernels on thread-local scratch vectors; no step sorts the whole vocabulary.
// sample() throws andy::Error for a row that is not 1-D fp32 CPU or contains NaN, for a
// logit_bias id outside [0, vocab), and for a prompt / output id outside it when a penalty
// reads them.
#include "serve/sampler.h"

#include "core/base/format.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/base/avx2_math.h"
#include "core/base/error.h"

namespace andy::serve {

namespace {

constexpr double kGreedyTemperature = 1e-5;  // below this temperature sampling is argmax
constexpr double kMaxTemperature = 100.0;
constexpr double kMaxPenalty = 2.0;  // presence / frequency, OpenAI's range
constexpr double kMaxRepetitionPenalty = 100.0;
constexpr double kMaxLogitBias = 100.0;
constexpr int64_t kMaxN = 128;
constexpr int64_t kMaxLogprobs = 20;
constexpr int64_t kTopPSortedTail = 64;  // top_p's radix select sorts what is left below this
constexpr int kRadixBits = 11;           // top_p's radix select: 2048 bins a pass
constexpr int64_t kTopKHeapMax = 1024;   // larger top_k: nth_element instead of a heap

// Shortest text that reads back as the same value ("-1", "0.95", "1e-07").
std::string format_number(double v) { return shortest_number(v); }
std::string format_number(int64_t v) { return std::to_string(v); }

// Keeps the first failed check as "name = value: expected range"; "" while all pass.
class FirstError {
 public:
  template <typename T>
  void check(bool ok, const std::string& name, T value, const std::string& range) {
    if (!ok && message_.empty())
      message_ = name + " = " + format_number(value) + ": expected " + range;
  }
  const std::string& message() const { return message_; }

 private:
  std::string message_;
};

// Uniform double in [0, 1) from the top 53 bits of one 64-bit draw; the same on every platform.
double uniform01(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

at::Tensor as_tensor(std::vector<double>& v) {
  return at::from_blob(v.data(), {static_cast<int64_t>(v.size())}, at::kDouble);
}

// Sum by ATen's vectorised kernel (a scalar loop is bound by the add latency).
double sum(std::vector<double>& v) { return as_tensor(v).sum().item<double>(); }

// Largest value by ATen's vectorised kernel (a scalar loop is bound by the compare latency).
double max_value(std::vector<double>& x) { return as_tensor(x).max().item<double>(); }

// log(sum(exp(x))) in double; -inf when every x is -inf. tmp: scratch for exp(x - max).
double log_sum_exp(std::vector<double>& x, std::vector<double>& tmp) {
  const double max_x = max_value(x);
  if (!std::isfinite(max_x)) return max_x;
  tmp.resize(x.size());
  at::Tensor t = as_tensor(tmp);
  at::sub_out(t, as_tensor(x), max_x).exp_();
  return max_x + std::log(sum(tmp));
}

// Index of the largest value; the lowest index among ties.
int32_t argmax(std::vector<double>& x) {
  return static_cast<int32_t>(std::find(x.begin(), x.end(), max_value(x)) - x.begin());
}

// A token and its weight. Better orders by weight, descending, then by id, ascending: a strict
// total order, so the filters keep the same tokens on every platform, and top_k = 1 is greedy.
struct Candidate {
  double w;
  int32_t id;
};
bool better(const Candidate& a, const Candidate& b) {
  return a.w > b.w || (a.w == b.w && a.id < b.id);
}

// Buffers reused by every sample() call on a thread (the engine thread samples each sequence
// in turn), so a step neither allocates nor page-faults in fresh memory.
struct Workspace {
  std::vector<double> x;       // processed logits
  std::vector<double> w;       // sampling weights
  std::vector<Candidate> c;    // top_k / top_p / logprobs candidates
  std::vector<uint8_t> seen;   // repetition penalty: token already penalised
  std::vector<double> mass;    // top_p radix select: weight per digit
  std::vector<int64_t> count;  // top_p radix select: tokens per digit
};
Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

void check_token_ids(const std::vector<int32_t>& ids, int64_t vocab, const char* what) {
  for (int32_t id : ids) {
    ANDY_CHECK(id >= 0 && id < vocab, "sampler: ", what, " token id ", id,
               " outside the vocabulary [0, ", vocab, ")");
  }
}

// Step 1: logit_bias, added to the raw logits.
void apply_logit_bias(std::vector<double>& x, const std::map<int32_t, double>& bias) {
  const int64_t vocab = static_cast<int64_t>(x.size());
  for (const auto& [id, b] : bias) {
    ANDY_CHECK(id >= 0 && id < vocab, "sampler: logit_bias token id ", id,
               " outside the vocabulary [0, ", vocab, ")");
    x[id] += b;
  }
}

// Step 2: repetition penalty over prompt and output tokens (each id once, as HF/vLLM), then the
// OpenAI frequency and presence penalties over output tokens only. Touches only those ids.
void apply_penalties(std::vector<double>& x, const SamplingParams& p,
                     const std::vector<int32_t>& prompt, const std::vector<int32_t>& output,
                     std::vector<uint8_t>& seen) {
  const bool repetition = p.repetition_penalty != 1.0;
  const bool additive = p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
  if (!repetition && !additive) return;
  const int64_t vocab = static_cast<int64_t>(x.size());
  check_token_ids(output, vocab, "output");
  if (repetition) {
    check_token_ids(prompt, vocab, "prompt");
    seen.assign(x.size(), 0);
    const double r = p.repetition_penalty;
    for (const auto* ids : {&prompt, &output}) {
      for (int32_t id : *ids) {
        if (seen[id]) continue;
        seen[id] = 1;
        x[id] = x[id] > 0 ? x[id] / r : x[id] * r;
      }
    }
  }
  if (additive) {
    std::vector<int32_t> sorted = output;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 0; i < sorted.size();) {
      size_t j = i;
      while (j < sorted.size() && sorted[j] == sorted[i]) ++j;
      x[sorted[i]] -= p.frequency_penalty * static_cast<double>(j - i) + p.presence_penalty;
      i = j;
    }
  }
}

// Step 3: w = softmax(x / t) by ATen's vectorised kernel. Divides x in place.
void softmax_weights(std::vector<double>& x, double temperature, std::vector<double>& w) {
  const double max_x = max_value(x);
  w.resize(x.size());
  if (!std::isfinite(max_x)) {  // +inf logits share all the mass; all -inf: uniform
    for (size_t i = 0; i < x.size(); ++i) w[i] = x[i] == max_x ? 1.0 : 0.0;
    return;
  }
  at::Tensor xt = as_tensor(x);
  at::Tensor wt = as_tensor(w);
  if (temperature != 1.0) xt.div_(temperature);
  at::softmax_out(wt, xt, 0);
}

// The k best tokens (0 < k < vocab), the worst of them first. Small k: one pass keeping a heap
// whose front is the worst kept token (a later token with an equal weight has a higher id, so
// only a strictly larger weight displaces it); large k: nth_element over all tokens.
template <typename T>
void top_k_candidates(const T* w, int32_t vocab, int64_t k, std::vector<Candidate>& c) {
  c.clear();
  if (k > kTopKHeapMax) {
    for (int32_t i = 0; i < vocab; ++i) c.push_back({static_cast<double>(w[i]), i});
    std::nth_element(c.begin(), c.begin() + (k - 1), c.end(), better);
    c.resize(k);
    std::swap(c.front(), c.back());
    return;
  }
  for (int32_t i = 0; i < k; ++i) c.push_back({static_cast<double>(w[i]), i});
  std::make_heap(c.begin(), c.end(), better);
  for (int32_t i = static_cast<int32_t>(k); i < vocab; ++i) {
    if (w[i] > c.front().w) {
      std::pop_heap(c.begin(), c.end(), better);
      c.back() = {static_cast<double>(w[i]), i};
      std::push_heap(c.begin(), c.end(), better);
    }
  }
}

// Every token that can be in the top_p nucleus of `total` mass. A token of weight below
// (1 - top_p) x total / vocab cannot: the tokens no better than it weigh less than
// (1 - top_p) x total together, so the better ones already reach top_p. Halved for rounding.
void top_p_candidates(const std::vector<double>& w, double total, double top_p,
                      std::vector<Candidate>& c) {
  const double floor = 0.5 * (1.0 - top_p) * total / static_cast<double>(w.size());
  c.resize(w.size());
  size_t n = 0;
  for (int32_t i = 0; i < static_cast<int32_t>(w.size()); ++i) {  // branch-free compaction
    c[n] = {w[i], i};
    n += w[i] >= floor && w[i] > 0;
  }
  c.resize(n);
}

// The worst candidate in `better` order.
Candidate worst(const std::vector<Candidate>& c) {
  return *std::max_element(c.begin(), c.end(), better);
}

// The least likely token that top_p keeps among c (non-empty, holding every nucleus token): the
// end of the smallest prefix, in `better` order, whose weight reaches `needed` (at least one
// token). A radix select on the weights' bit patterns (for w >= 0 they order as the values),
// kRadixBits at a time from the top: each pass sums the weight per digit, keeps every token
// of the digits above the one where the running sum reaches `needed`, and narrows c to that
// digit. Sorts only what is left: at most kTopPSortedTail candidates, or a run of equal
// weights (ordered by id). Reorders c.
Candidate nucleus_boundary(std::vector<Candidate>& c, double needed, std::vector<double>& mass,
                           std::vector<int64_t>& count) {
  constexpr int kBins = 1 << kRadixBits;
  mass.resize(kBins);
  count.resize(kBins);
  // First digit: the exponent (bits 52..62; the sign bit is 0); then the mantissa from the top.
  for (int shift = 52; static_cast<int64_t>(c.size()) > kTopPSortedTail;
       shift = std::max(shift - kRadixBits, 0)) {
    auto digit = [shift](double w) {
      uint64_t bits;
      std::memcpy(&bits, &w, sizeof(bits));
      return static_cast<int>((bits >> shift) & (kBins - 1));
    };
    std::fill(mass.begin(), mass.end(), 0.0);
    std::fill(count.begin(), count.end(), 0);
    for (const Candidate& t : c) {
      mass[digit(t.w)] += t.w;
      ++count[digit(t.w)];
    }
    int d = kBins - 1;  // the digit where the running sum reaches `needed`
    for (; d >= 0; --d) {
      if (count[d] == 0) continue;
      if (mass[d] >= needed) break;
      needed -= mass[d];
    }
    if (d < 0) return worst(c);  // rounding: every candidate is kept
    c.erase(std::remove_if(c.begin(), c.end(), [&](const Candidate& t) { return digit(t.w) != d; }),
            c.end());
    if (shift == 0) break;  // equal weights: the order is by id
  }
  std::sort(c.begin(), c.end(), better);
  double cum = 0;
  for (const Candidate& t : c) {
    cum += t.w;
    if (cum >= needed) return t;
  }
  return c.back();  // rounding: the whole range
}

// Zeroes the weight of every token worse than `last`.
void keep_down_to(std::vector<double>& w, const Candidate& last) {
  for (int32_t i = 0; i < static_cast<int32_t>(w.size()); ++i) {
    const bool worse = w[i] < last.w || (w[i] == last.w && i > last.id);
    w[i] = worse ? 0.0 : w[i];
  }
}

// Step 4: top_k then top_p (on the distribution renormalised over the top_k set, as vLLM).
// Exactly top_k tokens stay, ties going to the lower id. No full sort: both keep a prefix of the
// tokens in `better` order, found by selection, then zero the weights of the rest.
void apply_top_k_top_p(std::vector<double>& w, int64_t top_k, double top_p, Workspace& ws) {
  const int64_t vocab = static_cast<int64_t>(w.size());
  const bool use_k = top_k > 0 && top_k < vocab;
  const bool use_p = top_p < 1.0;
  if (!use_k && !use_p) return;
  std::vector<Candidate>& c = ws.c;
  double total = 0;  // the mass top_p is a fraction of
  if (use_k) {
    top_k_candidates(w.data(), static_cast<int32_t>(vocab), top_k, c);
    for (const Candidate& t : c) total += t.w;
  } else {
    total = sum(w);
    top_p_candidates(w, total, top_p, c);
  }
  const Candidate last = use_p ? nucleus_boundary(c, top_p * total, ws.mass, ws.count) : c.front();
  keep_down_to(w, last);
}

// Step 5: min_p drops tokens whose probability is below min_p x the top one (the ratio does
// not depend on renormalisation, and the top token always survives top_k / top_p).
void apply_min_p(std::vector<double>& w, double min_p) {
  if (min_p <= 0) return;
  const double threshold = min_p * max_value(w);
  for (double& v : w) {
    if (v < threshold) v = 0;
  }
}

// Step 6: inverse CDF over the weights in token-id order. Falls back to the last token with
// weight when rounding leaves u beyond the accumulated mass.
int32_t draw(std::vector<double>& w, std::mt19937_64& rng) {
  const double u = uniform01(rng) * sum(w);
  double cum = 0;
  int32_t last = 0;
  for (int32_t i = 0; i < static_cast<int32_t>(w.size()); ++i) {
    if (w[i] <= 0) continue;
    cum += w[i];
    last = i;
    if (u < cum) return last;
  }
  return last;
}

// Logprob of out.token and the k most likely tokens (ties: lower id first) under the raw
// logits, given their log_sum_exp `lse`: log_softmax = raw - lse.
void fill_logprobs(const float* raw, int64_t vocab, double lse, int64_t k, SampledToken& out,
                   std::vector<Candidate>& c) {
  auto logprob = [&](int64_t i) {
    return std::isfinite(lse) ? static_cast<double>(raw[i]) - lse
                              : -std::numeric_limits<double>::infinity();
  };
  out.logprob = logprob(out.token);
  out.top.clear();
  if (k <= 0) return;
  top_k_candidates(raw, static_cast<int32_t>(vocab), std::min(k, vocab), c);
  std::sort(c.begin(), c.end(), better);
  out.top.reserve(c.size());
  for (const Candidate& t : c) out.top.emplace_back(t.id, logprob(t.id));
}

}  // namespace

SampledToken score_token(const at::Tensor& logits, int32_t token, int64_t k) {
  const at::Tensor row = logits.contiguous();
  const int64_t vocab = row.numel();
  ANDY_CHECK(row.scalar_type() == at::kFloat && token >= 0 && token < vocab, "score_token: token ", token,
             " of a vocabulary of ", vocab);
  const float* raw = row.data_ptr<float>();
  Workspace& ws = workspace();
  ws.x.assign(raw, raw + vocab);
  const double lse = log_sum_exp(ws.x, ws.w);
  SampledToken out;
  out.token = token;
  fill_logprobs(raw, vocab, lse, k, out, ws.c);
  return out;
}

std::string SamplingParams::validate(int64_t vocab_size) const {
  const std::string id_range = "0 <= id < " + format_number(vocab_size) + " (the vocabulary)";
  FirstError e;
  e.check(max_tokens >= 1, "max_tokens", max_tokens, "max_tokens >= 1");
  e.check(temperature >= 0 && temperature <= kMaxTemperature, "temperature", temperature,
          "0 <= temperature <= 100");
  e.check(top_p > 0 && top_p <= 1, "top_p", top_p, "0 < top_p <= 1");
  e.check(top_k >= -1, "top_k", top_k, "top_k >= -1 (0 or -1: off)");
  e.check(min_p >= 0 && min_p <= 1, "min_p", min_p, "0 <= min_p <= 1");
  e.check(presence_penalty >= -kMaxPenalty && presence_penalty <= kMaxPenalty, "presence_penalty",
          presence_penalty, "-2 <= presence_penalty <= 2");
  e.check(frequency_penalty >= -kMaxPenalty && frequency_penalty <= kMaxPenalty,
          "frequency_penalty", frequency_penalty, "-2 <= frequency_penalty <= 2");
  e.check(repetition_penalty > 0 && repetition_penalty <= kMaxRepetitionPenalty,
          "repetition_penalty", repetition_penalty, "0 < repetition_penalty <= 100");
  for (const auto& [id, bias] : logit_bias) {
    e.check(id >= 0 && id < vocab_size, "logit_bias token id", int64_t{id}, id_range);
    e.check(bias >= -kMaxLogitBias && bias <= kMaxLogitBias,
            "logit_bias[" + std::to_string(id) + "]", bias, "-100 <= logit_bias <= 100");
  }
  for (size_t i = 0; i < stop_token_ids.size(); ++i) {
    const int32_t id = stop_token_ids[i];
    e.check(id >= 0 && id < vocab_size, "stop_token_ids[" + std::to_string(i) + "]", int64_t{id},
            id_range);
  }
  e.check(n >= 1 && n <= kMaxN, "n", n, "1 <= n <= 128");
  e.check(logprobs >= -1 && logprobs <= kMaxLogprobs, "logprobs", logprobs, "-1 <= logprobs <= 20");
  e.check(prompt_logprobs >= -1 && prompt_logprobs <= kMaxLogprobs, "prompt_logprobs", prompt_logprobs,
          "-1 <= prompt_logprobs <= 20");
  return e.message();
}

SequenceSampler::SequenceSampler(const SamplingParams& params, uint64_t seed)
    : params_(params), rng_(seed) {}

bool is_plain_greedy(const SamplingParams& p) {
  const bool penalties = p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
  return p.temperature < kGreedyTemperature && p.logprobs < 0 && p.logit_bias.empty() && !penalties;
}

SampledToken SequenceSampler::sample(const at::Tensor& logits, const std::vector<int32_t>& prompt,
                                     const std::vector<int32_t>& output) {
  ANDY_CHECK(logits.defined() && logits.dim() == 1 && logits.numel() > 0 &&
                 logits.scalar_type() == at::kFloat && logits.device().is_cpu(),
             "sampler: logits must be a non-empty 1-D fp32 CPU tensor, got ",
             logits.defined() ? logits.sizes() : at::IntArrayRef{},
             logits.defined() ? std::string(" ") + c10::toString(logits.scalar_type()) : "");
  const at::Tensor row = logits.contiguous();
  const int64_t vocab = row.numel();
  const float* raw = row.data_ptr<float>();
  if (is_plain_greedy(params_)) {
    // Plain greedy: one pass over the fp32 row (the same token as the double path below: the
    // conversion keeps the order, and the lowest index wins ties).
    bool nan = false;
    const int64_t best = argmax_f32(raw, vocab, nan);
    ANDY_CHECK(!nan, "sampler: logits contain NaN");
    SampledToken out;
    out.token = static_cast<int32_t>(best);
    return out;
  }
  Workspace& ws = workspace();
  std::vector<double>& x = ws.x;
  x.assign(raw, raw + vocab);
  ANDY_CHECK(std::none_of(x.begin(), x.end(), [](double v) { return std::isnan(v); }),
             "sampler: logits contain NaN");
  // Before any processing: logprobs are raw. Skipped when no logprobs are asked (a pass over
  // the vocabulary in double per token).
  const bool want_logprobs = params_.logprobs >= 0;
  const double raw_lse = want_logprobs ? log_sum_exp(x, ws.w) : 0.0;

  apply_logit_bias(x, params_.logit_bias);
  apply_penalties(x, params_, prompt, output, ws.seen);

  SampledToken out;
  if (params_.temperature < kGreedyTemperature) {
    out.token = argmax(x);
  } else {
    softmax_weights(x, params_.temperature, ws.w);
    apply_top_k_top_p(ws.w, params_.top_k, params_.top_p, ws);
    apply_min_p(ws.w, params_.min_p);
    out.token = draw(ws.w, rng_);
  }
  if (want_logprobs) fill_logprobs(raw, vocab, raw_lse, params_.logprobs, out, ws.c);
  return out;
}

}  // namespace andy::serve
