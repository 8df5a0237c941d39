// `andyllm generate` and `bench generate` end to end, through the real executable under mpirun,
// on models trained here by `andyllm train` (a small corpus, `andyllm preprocess`, a few steps
// at TP=1 and at TP=2): a checkpoint written at one TP size is served at others with identical
// greedy tokens; each kind of bad input stops with one clear line, a non-zero exit and no
// output file; a killed rank ends the job within seconds.
#include <gtest/gtest.h>
#include <signal.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <thread>
#include <nlohmann/json.hpp>

#include "tests/data/data_test_util.h"
#include "tests/launch/job.h"
#include "tests/launch/run_command.h"
#include "tests/serve/serve_test_util.h"

namespace fs = std::filesystem;
using namespace andy::testing_util;
namespace dt = andy::data::testing;
using json = nlohmann::json;

namespace {

// Shared by every test: a corpus, its tokenizer and shards, and two trained runs.
class GenerateE2e : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new dt::TempDir("andyllm-generate-e2e");
    prepare_tiny_corpus(dir_->path());
    train("tp1", 1);
    train("tp2", 2);
  }
  static void TearDownTestSuite() { delete dir_; }

  static void train(const std::string& name, int tp) { train_tiny(dir_->path(), name, tp); }

  static std::string checkpoint(const std::string& run) { return *dir_ / (run + "/checkpoints/step_00000006"); }
  static std::string path(const std::string& p) { return *dir_ / p; }

  // Greedy token ids of three prompts, served by `ranks` ranks.
  static std::vector<std::vector<int>> greedy(const std::string& model, int ranks) {
    const std::string out = path("out_" + std::to_string(ranks) + ".jsonl");
    auto r = run_command(mpirun(ranks) + andyllm_bin() + " generate --model " + model +
                         " --prompt 'the cat' --prompt 'a quick brown fox jumps' --prompt 'river' "
                         "--max_tokens 12 --temperature 0 --ignore_eos --output " + out);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    std::vector<std::vector<int>> ids;
    std::ifstream f(out);
    for (std::string line; std::getline(f, line);) ids.push_back(json::parse(line)["token_ids"].get<std::vector<int>>());
    EXPECT_EQ(ids.size(), 3u) << r.output;
    return ids;
  }

  static dt::TempDir* dir_;
};
dt::TempDir* GenerateE2e::dir_ = nullptr;

TEST_F(GenerateE2e, ACheckpointIsServedAtAnyTpSizeWithTheSameGreedyTokens) {
  auto tp2_at_1 = greedy(checkpoint("tp2"), 1);
  EXPECT_EQ(greedy(checkpoint("tp2"), 2), tp2_at_1) << "trained at TP=2, served at TP=2 vs TP=1";
  EXPECT_EQ(greedy(checkpoint("tp2"), 4), tp2_at_1) << "trained at TP=2, served at TP=4 vs TP=1";
  auto tp1_at_1 = greedy(checkpoint("tp1"), 1);
  EXPECT_EQ(greedy(checkpoint("tp1"), 2), tp1_at_1) << "trained at TP=1, served at TP=2 vs TP=1";
  EXPECT_EQ(greedy(path("tp1/best_model"), 2).size(), 3u);
  EXPECT_EQ(tp1_at_1[0].size(), 12u);
}

// Serving reads a checkpoint's weights only (model_tpRR.safetensors): without the optimizer
// files (shard_tpRR.pt, AdamW moments) it serves the same tokens at the same and another TP size.
TEST_F(GenerateE2e, ACheckpointIsServedFromItsWeightsAlone) {
  const std::string weights_only = path("weights_only");
  fs::copy(checkpoint("tp2"), weights_only);
  int removed = 0;
  for (const auto& e : fs::directory_iterator(weights_only))
    if (e.path().filename().string().rfind("shard_tp", 0) == 0) removed += fs::remove(e.path()) ? 1 : 0;
  EXPECT_EQ(removed, 2);
  const auto want = greedy(checkpoint("tp2"), 1);
  EXPECT_EQ(greedy(weights_only, 1), want) << "TP=2 checkpoint served at TP=1 from its weights alone";
  EXPECT_EQ(greedy(weights_only, 2), want) << "TP=2 checkpoint served at TP=2 from its weights alone";
}

TEST_F(GenerateE2e, WritesOneJsonLinePerCompletion) {
  const std::string prompts = path("prompts.jsonl"), out = path("gen.jsonl");
  std::string text;
  for (int i = 0; i < 20; ++i) text += (i % 2 ? "\"the dog " : "{\"prompt\": \"a red ") + std::to_string(i) + (i % 2 ? "\"\n" : "\"}\n");
  dt::write_file(prompts, text);
  auto r = run_command(mpirun(2) + andyllm_bin() + " generate --model " + path("tp1/best_model") +
                       " --prompts_file " + prompts + " --output " + out + " --max_tokens 5 --n 2 --seed 7 "
                       "--temperature 0.8 --logprobs 2 --ignore_eos");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream f(out);
  int lines = 0;
  for (std::string line; std::getline(f, line); ++lines) {
    json j = json::parse(line);
    EXPECT_EQ(j["completion_tokens"].get<int>(), 5);
    EXPECT_EQ(j["finish_reason"], "length");
    EXPECT_EQ(j["token_ids"].size(), 5u);
    EXPECT_EQ(j["logprobs"].size(), 5u);
    EXPECT_EQ(j["logprobs"][0]["top_logprobs"].size(), 2u);
    EXPECT_TRUE(j.contains("text") && j.contains("prompt_tokens") && j.contains("prompt"));
  }
  EXPECT_EQ(lines, 40);
}

// --dtype bf16 (weights, activations and, by default, the KV cache in bf16) and --kv_cache_dtype
// fp16 under the real executable at TP=2: every prompt completes, and the log says what was used.
TEST_F(GenerateE2e, ServesInBf16AndWithANarrowKvCache) {
  for (const std::string flags : {"--dtype bf16", "--kv_cache_dtype fp16"}) {
    const std::string out = path("narrow.jsonl");
    auto r = run_command(mpirun(2) + andyllm_bin() + " generate --model " + path("tp1/best_model") +
                         " --prompt 'the cat' --prompt 'a quick brown fox' --max_tokens 6 --ignore_eos --output " + out +
                         " " + flags);
    ASSERT_EQ(r.exit_code, 0) << flags << "\n" << r.output;
    std::ifstream f(out);
    int lines = 0;
    for (std::string line; std::getline(f, line); ++lines) EXPECT_EQ(json::parse(line)["completion_tokens"], 6) << line;
    EXPECT_EQ(lines, 2) << flags;
    const std::string want = flags == "--dtype bf16" ? "(BFloat16); weights BFloat16" : "(Half); weights Float";
    EXPECT_EQ(count_of(r.output, want), 1) << flags << "\n" << r.output;
  }
}

// Each bad input: exit code, the line that says what is wrong (printed once), no output file.
TEST_F(GenerateE2e, BadInputStopsWithOneClearLineAndWritesNothing) {
  const std::string model = path("tp1/best_model"), out = path("never.jsonl");
  // Weights and a config of different shapes.
  const std::string other = path("other_model");
  fs::create_directories(other);
  fs::copy_file(model + "/model.pt", other + "/model.pt", fs::copy_options::overwrite_existing);
  std::string conf = dt::read_text(model + "/config.toml");
  conf.replace(conf.find("dim = 32"), 8, "dim = 64");
  dt::write_file(other + "/config.toml", conf);
  // A tokenizer with another vocabulary.
  auto t = run_command(andyllm_bin() + " preprocess --input_dir " + path("raw") + " --output_dir " +
                       path("data320") + " --vocab_size 320 --txt_docs blank_lines");
  ASSERT_EQ(t.exit_code, 0) << t.output;
  dt::write_file(path("bad_utf8.jsonl"), "{\"prompt\": \"fine\"}\n{\"prompt\": \"bad \xff\xfe\"}\n");
  std::string long_prompt;
  for (int i = 0; i < 80; ++i) long_prompt += "cat ";
  struct Case {
    std::string what, args, expect;
    int ranks, code;
  };
  const std::vector<Case> cases = {
      {"missing model", "--model " + path("no_such_model") + " --prompt hi", "no_such_model: no such file or directory", 2, 2},
      {"another shape", "--model " + other + " --prompt hi", "has shape [300, 32], the saved config implies [300, 64]", 2, 1},
      {"tokenizer of another vocabulary", "--model " + model + " --prompt hi --tokenizer_path " + path("data320/tokenizer.model"),
       "has 320 pieces but the model", 2, 2},
      {"prompt longer than the context", "--model " + model + " --prompt '" + long_prompt + "'", "exceeds max_model_len = 64", 2, 2},
      {"non-UTF-8 prompts file", "--model " + model + " --prompts_file " + path("bad_utf8.jsonl"), "bad_utf8.jsonl:2: not valid UTF-8", 2, 2},
      {"TP size that does not divide the heads", "--model " + model + " --prompt hi", "cannot serve " + model + " on 3 tensor-parallel ranks", 3, 2},
      {"fp16 on CPU", "--model " + model + " --prompt hi --dtype fp16", "fp16 matrix products need a GPU", 2, 2},
      {"unknown KV-cache dtype", "--model " + model + " --prompt hi --kv_cache_dtype int4",
       "kv_cache_dtype = \"int4\": expected one of auto, fp32, bf16, fp16", 2, 2},
  };
  for (const Case& c : cases) {
    auto r = run_command(mpirun(c.ranks) + andyllm_bin() + " generate " + c.args + " --output " + out);
    EXPECT_EQ(r.exit_code, c.code) << c.what << "\n" << r.output;
    EXPECT_EQ(count_of(r.output, c.expect), 1) << c.what << "\n" << r.output;
    EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << c.what << "\n" << r.output;
    EXPECT_FALSE(fs::exists(out)) << c.what << ": an output file was written";
    std::printf("  %-40s exit %d\n", c.what.c_str(), r.exit_code);
  }
}

// `generate` on 1,000 short prompts (served by continuous batching): its resident memory,
// sampled every 20 ms, does not grow in the last third of the run (at most 5 % + 8 MiB over the
// largest value of the middle third; the first third holds the start-up, and the warm-up may
// reach into the middle one when the run is short: 1.2 s here with the fused kernels), and every
// prompt gets its completion.
TEST_F(GenerateE2e, ResidentMemoryIsStableOverAThousandPrompts) {
  const std::vector<std::string> words = {"the", "cat", "sat", "on", "a", "mat", "river", "tree", "blue", "morning"};
  {
    std::ofstream f(path("thousand.jsonl"));
    for (int i = 0; i < 1000; ++i) {
      std::string prompt;
      for (int k = 0; k <= i % 3; ++k) prompt += (k ? " " : "") + words[(i * 7 + k * 3) % words.size()];
      f << json{{"prompt", prompt}}.dump() << "\n";
    }
  }
  Job job(andyllm_bin() + " generate --model " + path("tp1/best_model") + " --prompts_file " + path("thousand.jsonl") +
              " --max_tokens 40 --ignore_eos --temperature 0.8 --seed 3 --output " + path("thousand_out.jsonl"),
          path("thousand.log"));
  ASSERT_GT(job.pid, 0);
  std::vector<int64_t> rss;
  while (!job.exited()) {
    std::ifstream st("/proc/" + std::to_string(job.pid) + "/status");
    for (std::string line; std::getline(st, line);)
      if (line.rfind("VmRSS:", 0) == 0) rss.push_back(std::stoll(line.substr(6)) * 1024);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_EQ(job.exit_code(), 0) << job.output();
  ASSERT_GE(rss.size(), 8u) << "the run was too short to sample";
  const auto third = rss.begin() + static_cast<std::ptrdiff_t>(rss.size() / 3);
  const auto two_thirds = rss.begin() + static_cast<std::ptrdiff_t>(2 * rss.size() / 3);
  const int64_t warm = *std::max_element(third, two_thirds);
  const int64_t later = *std::max_element(two_thirds, rss.end());
  std::string series;
  for (size_t i = 0; i < rss.size(); i += std::max<size_t>(1, rss.size() / 20)) series += std::to_string(rss[i] >> 20) + " ";
  EXPECT_LE(later, warm + warm / 20 + (8 << 20)) << "RSS kept growing (MiB over time: " << series << ")";
  std::ifstream out(path("thousand_out.jsonl"));
  int lines = 0;
  for (std::string line; std::getline(out, line);) {
    const json j = json::parse(line);
    EXPECT_EQ(j["completion_tokens"], 40);
    ++lines;
  }
  EXPECT_EQ(lines, 1000);
  std::printf("  1,000 prompts: %zu RSS samples, %.1f MiB at most in the middle third, %.1f MiB in the last (MiB over time: %s)\n",
              rss.size(), warm / 1048576.0, later / 1048576.0, series.c_str());
}

// --rounds 2: the concurrency list twice in turn; the closing line's ratios are each round's
// decode rates (the JSON rows') over its concurrency-1 rate, and their median.
TEST_F(GenerateE2e, BenchGenerateRoundsReportTheDecodeRatioPerRound) {
  const std::string out = path("bench_rounds.json");
  auto r = run_command(mpirun(2) + andyllm_bin() + " bench generate --model " + path("tp1/best_model") +
                       " --concurrency 1,3 --num_prompts 3 --input_len 8 --output_len 6 --rounds 2 --output " + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_of(r.output, "# round "), 2) << r.output;
  std::ifstream f(out);
  const json rows = json::parse(f);
  ASSERT_EQ(rows.size(), 4u) << rows.dump();
  std::vector<double> ratios;
  for (int round = 1; round <= 2; ++round) {
    const json& c1 = rows[2 * (round - 1)];
    const json& c3 = rows[2 * (round - 1) + 1];
    EXPECT_EQ(c1["round"], round);
    EXPECT_EQ(c1["concurrency"], 1);
    EXPECT_EQ(c3["concurrency"], 3);
    EXPECT_EQ(c3["requests"], 3);
    ASSERT_GT(c1["decode_tokens_per_s"].get<double>(), 0) << rows.dump();
    ratios.push_back(c3["decode_tokens_per_s"].get<double>() / c1["decode_tokens_per_s"].get<double>());
  }
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.output, m, std::regex(R"(# decode tok/s over concurrency 1, per round and the median: )"
                                                        R"(c=3 ([0-9.]+)x ([0-9.]+)x \(median ([0-9.]+)x\))")))
      << r.output;
  EXPECT_NEAR(std::stod(m[1]), ratios[0], 0.006) << r.output;
  EXPECT_NEAR(std::stod(m[2]), ratios[1], 0.006) << r.output;
  EXPECT_NEAR(std::stod(m[3]), (ratios[0] + ratios[1]) / 2, 0.006) << r.output;
  auto bad = run_command(andyllm_bin() + " bench generate --model " + path("tp1/best_model") + " --rounds 0");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_EQ(count_of(bad.output, "--rounds must be >= 1"), 1) << bad.output;
}

TEST_F(GenerateE2e, AKilledRankEndsTheJobWithinSeconds) {
  Job job(mpirun(2) + andyllm_bin() + " bench generate --model " + path("tp1/best_model") +
              " --concurrency 4 --num_prompts 100000 --input_len 8 --output_len 40",
          path("bench_kill.log"));
  ASSERT_GT(job.pid, 0);
  // Wait until the benchmark runs (its header is printed after the warm-up).
  for (int i = 0; i < 300 && job.output().find("# bench generate") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_NE(job.output().find("# bench generate"), std::string::npos) << job.output();
  std::vector<pid_t> ranks = children_of(job.pid);
  ASSERT_EQ(ranks.size(), 2u);
  ASSERT_EQ(kill(ranks.back(), SIGKILL), 0);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(job.wait_exit(30)) << "the job still runs 30 s after a rank was killed:\n" << job.output();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_NE(job.exit_code(), 0) << job.output();
  std::printf("  killed rank %d: the job ended with exit %d after %.1f s\n", ranks.back(), job.exit_code(), s);
}

}  // namespace
