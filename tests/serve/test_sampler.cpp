// SequenceSampler and SamplingParams::validate: greedy, logit_bias, the three penalties (checked
// at hand-computed decision thresholds), top_k / top_p / min_p filters, seeded reproducibility,
// the empirical distribution against softmax, logprobs against at::log_softmax in double.
// Convention: logits are built from std::vector<float>; every random draw is seeded, so each test
// is deterministic.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/base/error.h"
#include "serve/sampler.h"

using namespace andy::serve;

namespace {

at::Tensor row(const std::vector<float>& v) {
  return at::tensor(at::ArrayRef<float>(v), at::TensorOptions().dtype(at::kFloat));
}

// Logits whose softmax is exactly `probs` (up to fp32 rounding).
at::Tensor row_from_probs(const std::vector<double>& probs) {
  std::vector<float> v;
  for (double p : probs) v.push_back(static_cast<float>(std::log(p)));
  return row(v);
}

std::vector<float> random_logits(int64_t vocab, uint64_t seed, double scale = 1.0) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, static_cast<float>(scale));
  std::vector<float> v(vocab);
  for (auto& x : v) x = normal(gen);
  return v;
}

int32_t ref_argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

SamplingParams greedy() {
  SamplingParams p;
  p.temperature = 0;
  return p;
}

int32_t sample_once(const SamplingParams& p, const at::Tensor& logits,
                    const std::vector<int32_t>& prompt = {},
                    const std::vector<int32_t>& output = {}, uint64_t seed = 1) {
  SequenceSampler s(p, seed);
  return s.sample(logits, prompt, output).token;
}

// Counts of each token over `draws` draws from one sampler.
std::vector<int64_t> histogram(const SamplingParams& p, const at::Tensor& logits, int draws,
                               uint64_t seed = 1234) {
  SequenceSampler s(p, seed);
  std::vector<int64_t> count(logits.numel(), 0);
  for (int i = 0; i < draws; ++i) ++count[s.sample(logits, {}, {}).token];
  return count;
}

std::set<int32_t> drawn(const std::vector<int64_t>& count) {
  std::set<int32_t> s;
  for (size_t i = 0; i < count.size(); ++i) {
    if (count[i] > 0) s.insert(static_cast<int32_t>(i));
  }
  return s;
}

// Largest |empirical frequency - expected probability|.
double max_abs_diff(const std::vector<int64_t>& count, const std::vector<double>& probs,
                    int draws) {
  double worst = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(count[i]) / draws - probs[i]));
  }
  return worst;
}

std::vector<double> ref_softmax(const std::vector<float>& v, double temperature) {
  double m = *std::max_element(v.begin(), v.end());
  std::vector<double> p(v.size());
  double sum = 0;
  for (size_t i = 0; i < v.size(); ++i) sum += p[i] = std::exp((v[i] - m) / temperature);
  for (auto& x : p) x /= sum;
  return p;
}

}  // namespace

TEST(Sampler, GreedyPicksArgmaxLowestIdOnTies) {
  EXPECT_EQ(sample_once(greedy(), row({0.1f, 2.0f, -1.0f, 1.9f})), 1);
  EXPECT_EQ(sample_once(greedy(), row({1.0f, 3.0f, 3.0f, 0.0f})), 1);
  SamplingParams tiny;
  tiny.temperature = 1e-6;  // below 1e-5: greedy too
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto v = random_logits(500, seed);
    EXPECT_EQ(sample_once(greedy(), row(v)), ref_argmax(v));
    EXPECT_EQ(sample_once(tiny, row(v), {}, {}, seed), ref_argmax(v));
  }
  // Plain greedy takes a single pass over the fp32 row; -inf entries and a row of -inf behave as
  // in the double path (the lowest id), and a NaN anywhere is refused.
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(sample_once(greedy(), row({-inf, -inf, 0.5f, -inf})), 2);
  EXPECT_EQ(sample_once(greedy(), row({-inf, -inf, -inf})), 0);
  EXPECT_THROW(sample_once(greedy(), row({0.1f, std::nanf(""), 2.0f})), andy::Error);
  EXPECT_THROW(sample_once(greedy(), row({0.1f, 2.0f, std::nanf("")})), andy::Error);
  // Rows past the 8-wide vector body (19 entries: two vectors and a tail of 3): ties between
  // lanes, between a vector and the tail, +inf, all -inf, a NaN inside a vector and in the tail.
  std::vector<float> v(19, -1.0f);
  v[13] = v[5] = 4.0f;
  EXPECT_EQ(sample_once(greedy(), row(v)), 5);
  v[17] = 4.0f;
  v[5] = 0.0f;
  EXPECT_EQ(sample_once(greedy(), row(v)), 13);
  v[18] = inf;
  EXPECT_EQ(sample_once(greedy(), row(v)), 18);
  EXPECT_EQ(sample_once(greedy(), row(std::vector<float>(19, -inf))), 0);
  for (size_t at : {size_t{6}, size_t{17}}) {
    std::vector<float> w(19, 0.5f);
    w[at] = std::nanf("");
    EXPECT_THROW(sample_once(greedy(), row(w)), andy::Error) << "NaN at " << at;
  }
  for (uint64_t seed = 0; seed < 20; ++seed) {  // lengths that are not multiples of 8
    auto r = random_logits(4093 + seed, seed);
    EXPECT_EQ(sample_once(greedy(), row(r)), ref_argmax(r));
  }
}

TEST(Sampler, LogitBiasForcesAndBansTokens) {
  auto logits = row({0.5f, 3.0f, 1.0f, 0.0f});
  SamplingParams p = greedy();
  p.logit_bias[3] = 100;
  EXPECT_EQ(sample_once(p, logits), 3);
  p.logit_bias = {{1, -100}};  // ban the argmax: the next best wins
  EXPECT_EQ(sample_once(p, logits), 2);

  SamplingParams hot;  // temperature 1: +100 leaves every other token ~e^-97
  hot.logit_bias[0] = 100;
  auto count = histogram(hot, logits, 2000);
  EXPECT_EQ(count[0], 2000);
}

// Each case sits on one side of the decision the hand-computed penalised logit makes.
TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegative) {
  SamplingParams p = greedy();
  p.repetition_penalty = 2.0;
  // token 0 in the prompt: 2.0 / 2 = 1.0
  EXPECT_EQ(sample_once(p, row({2.0f, 1.1f}), {0}, {}), 1);
  EXPECT_EQ(sample_once(p, row({2.0f, 0.9f}), {0}, {}), 0);
  // token 0 in the output: -1.0 * 2 = -2.0
  EXPECT_EQ(sample_once(p, row({-1.0f, -1.9f}), {}, {0}), 1);
  EXPECT_EQ(sample_once(p, row({-1.0f, -2.1f}), {}, {0}), 0);
  // applied once per token however often it occurs: 2.0 / 2 = 1.0, not 0.5
  EXPECT_EQ(sample_once(p, row({2.0f, 0.9f}), {0, 0, 0}, {0, 0}), 0);
  // off at 1
  p.repetition_penalty = 1.0;
  EXPECT_EQ(sample_once(p, row({2.0f, 1.1f}), {0}, {0}), 0);
}

TEST(Sampler, FrequencyAndPresencePenaltiesCountOutputOnly) {
  auto logits = row({3.0f, 2.0f});
  SamplingParams f = greedy();
  f.frequency_penalty = 0.4;  // 3 - 0.4 * 3 = 1.8 < 2
  EXPECT_EQ(sample_once(f, logits, {}, {0, 0, 0}), 1);
  f.frequency_penalty = 0.3;  // 3 - 0.9 = 2.1 > 2
  EXPECT_EQ(sample_once(f, logits, {}, {0, 0, 0}), 0);
  f.frequency_penalty = 2.0;  // the prompt does not count
  EXPECT_EQ(sample_once(f, logits, {0, 0, 0}, {}), 0);

  SamplingParams pr = greedy();
  pr.presence_penalty = 0.9;  // 3 - 0.9 = 2.1, once, whatever the count
  EXPECT_EQ(sample_once(pr, logits, {}, {0, 0, 0}), 0);
  pr.presence_penalty = 1.1;  // 1.9
  EXPECT_EQ(sample_once(pr, logits, {}, {0}), 1);
  EXPECT_EQ(sample_once(pr, logits, {0}, {}), 0);

  SamplingParams neg = greedy();  // negative values encourage repeats
  neg.frequency_penalty = -0.6;   // 2 + 0.6 * 2 = 3.2 > 3
  EXPECT_EQ(sample_once(neg, logits, {}, {1, 1}), 1);
}

TEST(Sampler, ProcessingOrderBiasThenRepetitionThenAdditive) {
  SamplingParams p = greedy();
  // bias first: (1 + 1) / 2 = 1.0 < 1.2; (repetition first would give 0.5 + 1 = 1.5)
  p.logit_bias[0] = 1.0;
  p.repetition_penalty = 2.0;
  EXPECT_EQ(sample_once(p, row({1.0f, 1.2f}), {0}, {}), 1);
  // repetition before frequency: 3 / 2 - 1 = 0.5 < 0.7; (the other order: (3 - 1) / 2 = 1.0)
  SamplingParams q = greedy();
  q.repetition_penalty = 2.0;
  q.frequency_penalty = 1.0;
  EXPECT_EQ(sample_once(q, row({3.0f, 0.7f}), {}, {0}), 1);
}

TEST(Sampler, TopKOneEqualsGreedyAtAnyTemperature) {
  for (double t : {0.3, 1.0, 10.0, 100.0}) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = 1;
    for (uint64_t seed = 0; seed < 20; ++seed) {
      auto v = random_logits(300, seed + 100);
      SequenceSampler s(p, seed);
      for (int i = 0; i < 10; ++i) EXPECT_EQ(s.sample(row(v), {}, {}).token, ref_argmax(v));
    }
    // ties: the lowest id, as greedy
    EXPECT_EQ(sample_once(p, row({0.0f, 5.0f, 5.0f, 5.0f})), 1);
  }
}

TEST(Sampler, TinyTopPEqualsGreedy) {
  SamplingParams p;
  p.temperature = 5.0;
  p.top_p = 1e-9;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto v = random_logits(1000, seed + 200);
    SequenceSampler s(p, seed);
    for (int i = 0; i < 10; ++i) EXPECT_EQ(s.sample(row(v), {}, {}).token, ref_argmax(v));
  }
}

TEST(Sampler, TopKKeepsTheKMostLikelyAndRenormalises) {
  auto v = random_logits(40, 7);
  SamplingParams p;
  p.top_k = 3;
  const int draws = 20000;
  auto count = histogram(p, row(v), draws);
  // reference: softmax over the three largest logits only
  std::vector<int32_t> ids(v.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  std::vector<double> probs(v.size(), 0.0);
  double sum = 0;
  for (int i = 0; i < 3; ++i) sum += probs[ids[i]] = std::exp(static_cast<double>(v[ids[i]]));
  for (auto& x : probs) x /= sum;
  EXPECT_EQ(drawn(count), (std::set<int32_t>{ids[0], ids[1], ids[2]}));
  double diff = max_abs_diff(count, probs, draws);
  EXPECT_LT(diff, 0.02) << "largest |frequency - probability| = " << diff;
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  auto logits = row_from_probs({0.05, 0.5, 0.15, 0.3});
  SamplingParams p;
  p.top_p = 0.75;  // 0.5 + 0.3 reaches it
  EXPECT_EQ(drawn(histogram(p, logits, 2000)), (std::set<int32_t>{1, 3}));
  p.top_p = 0.85;  // needs 0.15 too
  EXPECT_EQ(drawn(histogram(p, logits, 2000)), (std::set<int32_t>{1, 2, 3}));
  p.top_p = 0.4;  // the top token alone
  EXPECT_EQ(drawn(histogram(p, logits, 2000)), (std::set<int32_t>{1}));
  // top_p applies to the distribution renormalised over top_k: 0.5 / 0.8 = 0.625 >= 0.6
  p.top_k = 2;
  p.top_p = 0.6;
  EXPECT_EQ(drawn(histogram(p, logits, 2000)), (std::set<int32_t>{1}));
}

// A nucleus of hundreds of tokens (more than the sampler's first sorted prefix), checked
// against a full sort.
TEST(Sampler, TopPLargeNucleusMatchesFullSort) {
  auto v = random_logits(2000, 11, 0.5);
  const double top_p = 0.9;
  auto probs = ref_softmax(v, 1.0);
  std::vector<int32_t> ids(v.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return probs[a] > probs[b]; });
  std::set<int32_t> nucleus;
  double cum = 0;
  for (int32_t id : ids) {
    nucleus.insert(id);
    cum += probs[id];
    if (cum >= top_p) break;
  }
  ASSERT_GT(nucleus.size(), 256u);
  SamplingParams p;
  p.top_p = top_p;
  auto seen = drawn(histogram(p, row(v), 5000));
  for (int32_t id : seen) EXPECT_TRUE(nucleus.count(id)) << "token " << id << " outside top_p";
  EXPECT_GT(seen.size(), 200u);
}

// top_k above the heap's limit (1024) takes the nth_element path.
TEST(Sampler, LargeTopKMatchesFullSort) {
  auto v = random_logits(3000, 12, 0.2);
  std::vector<int32_t> ids(v.size());
  std::iota(ids.begin(), ids.end(), 0);
  std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  const std::set<int32_t> kept(ids.begin(), ids.begin() + 2000);
  SamplingParams p;
  p.top_k = 2000;
  auto seen = drawn(histogram(p, row(v), 5000));
  for (int32_t id : seen) EXPECT_TRUE(kept.count(id)) << "token " << id << " outside top_k";
  EXPECT_GT(seen.size(), 1500u);
}

// Equal weights: top_k and top_p keep the lower ids, as greedy does.
TEST(Sampler, TiesKeepLowerIds) {
  SamplingParams k;
  k.top_k = 3;
  EXPECT_EQ(drawn(histogram(k, row(std::vector<float>(10, 0.0f)), 2000)),
            (std::set<int32_t>{0, 1, 2}));
  SamplingParams p;
  p.top_p = 0.4999;  // 500 of 1000 equally likely tokens
  auto seen = drawn(histogram(p, row(std::vector<float>(1000, 0.0f)), 3000));
  EXPECT_LT(*seen.rbegin(), 500);
  EXPECT_GT(seen.size(), 450u);
}

TEST(Sampler, MaskedLogitsAreNeverDrawn) {
  const float inf = std::numeric_limits<float>::infinity();
  auto logits = row({0.0f, -inf, 1.0f, -inf});
  SamplingParams p;
  p.logprobs = 4;
  SequenceSampler s(p, 5);
  std::set<int32_t> seen;
  for (int i = 0; i < 500; ++i) {
    SampledToken t = s.sample(logits, {}, {});
    seen.insert(t.token);
    ASSERT_EQ(t.top.size(), 4u);
    EXPECT_EQ(t.top[2].first, 1);
    EXPECT_EQ(t.top[3].second, -std::numeric_limits<double>::infinity());
  }
  EXPECT_EQ(seen, (std::set<int32_t>{0, 2}));
}

TEST(Sampler, MinPDropsTokensBelowTheFractionOfTheTop) {
  auto logits = row_from_probs({0.15, 0.5, 0.05, 0.3});
  SamplingParams p;
  p.min_p = 0.2;  // threshold 0.1: drops 0.05
  EXPECT_EQ(drawn(histogram(p, logits, 2000)), (std::set<int32_t>{0, 1, 3}));
  p.min_p = 0.5;  // threshold 0.25
  EXPECT_EQ(drawn(histogram(p, logits, 2000)), (std::set<int32_t>{1, 3}));
  p.min_p = 1.0;  // the top token alone
  EXPECT_EQ(drawn(histogram(p, logits, 2000)), (std::set<int32_t>{1}));
}

TEST(Sampler, SameSeedSameDrawsIndependentOfOtherSamplers) {
  SamplingParams p;
  p.temperature = 1.5;
  p.top_p = 0.95;
  SequenceSampler a(p, 42), b(p, 42), other(p, 42), c(p, 43);
  std::vector<int32_t> out_a, out_b, out_c;
  for (int step = 0; step < 100; ++step) {
    auto logits = row(random_logits(64, 1000 + step));
    out_a.push_back(a.sample(logits, {1, 2}, out_a).token);
    for (int k = 0; k < step % 3; ++k) other.sample(logits, {}, {});  // interleaved noise
    out_b.push_back(b.sample(logits, {1, 2}, out_b).token);
    out_c.push_back(c.sample(logits, {1, 2}, out_c).token);
  }
  EXPECT_EQ(out_a, out_b);
  EXPECT_NE(out_a, out_c);
}

TEST(Sampler, EmpiricalDistributionMatchesSoftmax) {
  const std::vector<float> v = {1.0f, 0.5f, -0.3f, 2.0f, 0.0f, -1.5f, 1.2f, 0.7f};
  const int draws = 20000;
  for (double t : {1.0, 2.0, 0.5}) {
    SamplingParams p;
    p.temperature = t;
    auto count = histogram(p, row(v), draws, 99);
    double diff = max_abs_diff(count, ref_softmax(v, t), draws);
    EXPECT_LT(diff, 0.02) << "temperature " << t
                          << ": largest |frequency - probability| = " << diff;
  }
}

TEST(Sampler, LogprobsAreLogSoftmaxOfRawLogits) {
  auto v = random_logits(100, 5, 3.0);
  auto logits = row(v);
  const at::Tensor before = logits.clone();
  auto ref = at::log_softmax(logits.to(at::kDouble), 0);
  const double* lp = ref.data_ptr<double>();

  SamplingParams p;  // processing must not touch the reported logprobs
  p.temperature = 0.7;
  p.logit_bias[3] = 5;
  p.repetition_penalty = 1.5;
  p.frequency_penalty = 0.5;
  p.logprobs = 5;
  SequenceSampler s(p, 3);
  for (int i = 0; i < 20; ++i) {
    SampledToken t = s.sample(logits, {1, 2, 3}, {4, 5});
    EXPECT_NEAR(t.logprob, lp[t.token], 1e-12);
    ASSERT_EQ(t.top.size(), 5u);
    std::vector<int32_t> ids(v.size());
    std::iota(ids.begin(), ids.end(), 0);
    std::sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return lp[a] > lp[b]; });
    for (size_t k = 0; k < 5; ++k) {
      EXPECT_EQ(t.top[k].first, ids[k]);
      EXPECT_NEAR(t.top[k].second, lp[ids[k]], 1e-12);
    }
  }
  EXPECT_TRUE(at::equal(logits, before)) << "sample() modified its input";

  p.logprobs = -1;
  SampledToken none = SequenceSampler(p, 3).sample(logits, {}, {});
  EXPECT_TRUE(none.top.empty());
  p.logprobs = 0;
  SampledToken chosen_only = SequenceSampler(p, 3).sample(logits, {}, {});
  EXPECT_TRUE(chosen_only.top.empty());
  EXPECT_NEAR(chosen_only.logprob, lp[chosen_only.token], 1e-12);
}

TEST(Sampler, LogprobsTopBreaksTiesByLowerId) {
  SamplingParams p = greedy();
  p.logprobs = 3;
  SampledToken t = SequenceSampler(p, 1).sample(row({1.0f, 2.0f, 1.0f, 2.0f, 0.0f}), {}, {});
  EXPECT_EQ(t.token, 1);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 1);
  EXPECT_EQ(t.top[1].first, 3);
  EXPECT_EQ(t.top[2].first, 0);
  EXPECT_DOUBLE_EQ(t.top[0].second, t.top[1].second);
}

TEST(Sampler, AcceptsNonContiguousRows) {
  auto v = random_logits(64, 8);
  auto table = at::stack({row(v), row(v)}, 1);  // [64, 2]; column 0 has stride 2
  auto col = table.select(1, 0);
  ASSERT_FALSE(col.is_contiguous());
  SamplingParams p = greedy();
  p.logprobs = 2;
  SampledToken t = SequenceSampler(p, 1).sample(col, {}, {});
  EXPECT_EQ(t.token, ref_argmax(v));
  EXPECT_EQ(t.top[0].first, ref_argmax(v));
}

TEST(Sampler, RejectsBadInput) {
  SequenceSampler s(SamplingParams{}, 1);
  EXPECT_THROW(s.sample(at::zeros({2, 4}), {}, {}), andy::Error);
  EXPECT_THROW(s.sample(at::zeros({4}, at::kDouble), {}, {}), andy::Error);
  EXPECT_THROW(s.sample(row({0.0f, NAN, 1.0f}), {}, {}), andy::Error);
  SamplingParams pen;
  pen.frequency_penalty = 1;
  EXPECT_THROW(SequenceSampler(pen, 1).sample(row({0.0f, 1.0f}), {}, {7}), andy::Error);
}

TEST(SamplingParams, DefaultsAreValid) {
  EXPECT_EQ(SamplingParams{}.validate(32000), "");
  SamplingParams p;
  p.temperature = 0;
  p.top_p = 1;
  p.top_k = -1;
  p.min_p = 1;
  p.presence_penalty = -2;
  p.frequency_penalty = 2;
  p.repetition_penalty = 100;
  p.logit_bias = {{0, -100}, {31999, 100}};
  p.stop_token_ids = {0, 31999};
  p.n = 128;
  p.logprobs = 20;
  EXPECT_EQ(p.validate(32000), "");
}

TEST(SamplingParams, ValidateNamesFieldValueAndRange) {
  struct Case {
    void (*set)(SamplingParams&);
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](SamplingParams& p) { p.max_tokens = 0; }, "max_tokens = 0: expected max_tokens >= 1"},
      {[](SamplingParams& p) { p.temperature = -1; },
       "temperature = -1: expected 0 <= temperature <= 100"},
      {[](SamplingParams& p) { p.temperature = NAN; },
       "temperature = nan: expected 0 <= temperature <= 100"},
      {[](SamplingParams& p) { p.top_p = 0; }, "top_p = 0: expected 0 < top_p <= 1"},
      {[](SamplingParams& p) { p.top_p = 1.5; }, "top_p = 1.5: expected 0 < top_p <= 1"},
      {[](SamplingParams& p) { p.top_k = -2; }, "top_k = -2: expected top_k >= -1 (0 or -1: off)"},
      {[](SamplingParams& p) { p.min_p = 1.25; }, "min_p = 1.25: expected 0 <= min_p <= 1"},
      {[](SamplingParams& p) { p.presence_penalty = 2.5; },
       "presence_penalty = 2.5: expected -2 <= presence_penalty <= 2"},
      {[](SamplingParams& p) { p.frequency_penalty = -3; },
       "frequency_penalty = -3: expected -2 <= frequency_penalty <= 2"},
      {[](SamplingParams& p) { p.repetition_penalty = 0; },
       "repetition_penalty = 0: expected 0 < repetition_penalty <= 100"},
      {[](SamplingParams& p) { p.logit_bias[100] = 1; },
       "logit_bias token id = 100: expected 0 <= id < 100 (the vocabulary)"},
      {[](SamplingParams& p) { p.logit_bias[5] = -101; },
       "logit_bias[5] = -101: expected -100 <= logit_bias <= 100"},
      {[](SamplingParams& p) {
         p.stop_token_ids = {3, -1};
       },
       "stop_token_ids[1] = -1: expected 0 <= id < 100 (the vocabulary)"},
      {[](SamplingParams& p) { p.n = 129; }, "n = 129: expected 1 <= n <= 128"},
      {[](SamplingParams& p) { p.logprobs = 21; }, "logprobs = 21: expected -1 <= logprobs <= 20"},
      {[](SamplingParams& p) { p.logprobs = -2; }, "logprobs = -2: expected -1 <= logprobs <= 20"},
  };
  for (const auto& c : cases) {
    SamplingParams p;
    c.set(p);
    EXPECT_EQ(p.validate(100), c.message);
  }
}
