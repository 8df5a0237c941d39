// Config schema, TOML loading, overrides and every promised error message.
#include <gtest/gtest.h>

#include <sched.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <thread>

#include "core/base/cpu.h"
#include "core/base/error.h"
#include "core/config/config.h"

using namespace andy;

namespace {

// Runs f, expects a ConfigError, returns its message (which must be one line).
template <typename F>
std::string config_error(F&& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message spans lines: " << msg;
    return msg;
  }
  ADD_FAILURE() << "expected a ConfigError";
  return "";
}

void expect_contains(const std::string& text, const std::string& part) {
  EXPECT_NE(text.find(part), std::string::npos) << "'" << part << "' not in: " << text;
}

Config from_toml(const std::string& text) {
  Config c;
  apply_toml_string(c, text, "run.toml");
  return c;
}

}  // namespace

TEST(Config, SchemaDescribesEveryKey) {
  Config defaults;
  ASSERT_GT(config_schema().size(), 40u);
  for (const auto& k : config_schema()) {
    EXPECT_FALSE(k.description.empty()) << k.dotted();
    EXPECT_NO_THROW(k.get(defaults)) << k.dotted();
  }
  std::string help = config_schema_help();
  expect_contains(help, "[model]");
  expect_contains(help, "tensor_parallel_size (integer, default 1, 1 <= value <= 4096)");
  expect_contains(help, "mode (string, default \"fp32\", one of fp32, bf16, fp16)");
}

TEST(Config, DefaultsAreValid) {
  Config c;
  EXPECT_NO_THROW(validate_config(c, 1));
  EXPECT_NO_THROW(validate_config(c, 2));
}

TEST(Config, FileSetsValuesAndRecordsOrigin) {
  Config c = from_toml("[model]\ndim = 128\nn_head = 4\nn_kv_head = 2\n[train]\nlearning_rate = 1\n"
                       "device = \"cpu\"\n[precision]\nmode = \"bf16\"\n");
  EXPECT_EQ(c.model.dim, 128);
  EXPECT_EQ(c.model.n_kv_head, 2);
  EXPECT_DOUBLE_EQ(c.train.learning_rate, 1.0);  // integer accepted for a float key
  EXPECT_EQ(c.precision.mode, "bf16");
  EXPECT_EQ(c.origin_of("model.dim"), "run.toml:2");
  EXPECT_EQ(c.origin_of("model.n_layer"), "default");
}

TEST(Config, PrecedenceDefaultsFileCommandLine) {
  Config c = from_toml("[train]\nbatch_size = 4\nseed = 7\n");
  apply_set(c, "train.batch_size=16");
  apply_value_text(c, "train.batch_size", "32", "--batch_size");
  EXPECT_EQ(c.train.batch_size, 32);  // last on the command line wins
  EXPECT_EQ(c.train.seed, 7);         // file beats default
  EXPECT_EQ(c.origin_of("train.batch_size"), "--batch_size");
  apply_set(c, "data.train_file = \"a b/c\"");
  EXPECT_EQ(c.data.train_file, "a b/c");
}

TEST(Config, UnknownKeySuggestsTheClosest) {
  auto msg = config_error([] { from_toml("[model]\ndim = 64\nn_heads = 4\n"); });
  expect_contains(msg, "run.toml:3");
  expect_contains(msg, "unknown key [model] n_heads");
  expect_contains(msg, "did you mean 'n_head'?");
  msg = config_error([] { from_toml("[train]\ntensor_parallel_size = 2\n"); });
  expect_contains(msg, "did you mean [parallel] tensor_parallel_size?");
  msg = config_error([] { Config c; apply_set(c, "train.learnig_rate=0.1"); });
  expect_contains(msg, "--set");
  expect_contains(msg, "did you mean 'learning_rate'?");
}

TEST(Config, UnknownSectionSuggestsTheClosest) {
  auto msg = config_error([] { from_toml("[modle]\ndim = 64\n"); });
  expect_contains(msg, "run.toml:");
  expect_contains(msg, "unknown section [modle] (did you mean [model]?)");
}

TEST(Config, WrongTypeNamesFileLineKeyAndExpectation) {
  auto msg = config_error([] { from_toml("\n[model]\ndim = \"big\"\n"); });
  expect_contains(msg, "run.toml:3: [model] dim: expected an integer, got a string");
  msg = config_error([] { from_toml("[model]\ntie_embeddings = 1\n"); });
  expect_contains(msg, "run.toml:2: [model] tie_embeddings: expected true or false, got an integer");
  msg = config_error([] { from_toml("[train]\nlearning_rate = \"fast\"\n"); });
  expect_contains(msg, "expected a number, got a string");
  msg = config_error([] { Config c; apply_set(c, "train.batch_size=eight"); });
  expect_contains(msg, "--set train.batch_size=eight: [train] batch_size = 'eight': expected an integer");
}

TEST(Config, OutOfRangeNamesTheRange) {
  auto msg = config_error([] { from_toml("[train]\nlearning_rate = -0.5\n"); });
  expect_contains(msg, "run.toml:2: [train] learning_rate = -0.5: out of range, expected 0 < value <= 10");
  msg = config_error([] { from_toml("[parallel]\ntensor_parallel_size = 0\n"); });
  expect_contains(msg, "expected 1 <= value <= 4096");
  msg = config_error([] { from_toml("[precision]\nmode = \"fp8\"\n"); });
  expect_contains(msg, "[precision] mode = \"fp8\": expected one of fp32, bf16, fp16");
  msg = config_error([] { from_toml("[train]\ndevice = \"cdua\"\n"); });
  expect_contains(msg, "did you mean 'cuda'?");
}

TEST(Config, SyntaxErrorHasLine) {
  auto msg = config_error([] { from_toml("[model]\ndim = = 3\n"); });
  expect_contains(msg, "run.toml:2: TOML syntax error");
  msg = config_error([] { Config c; apply_toml_file(c, "/nonexistent/run.toml"); });
  expect_contains(msg, "/nonexistent/run.toml");
  msg = config_error([] { from_toml("dim = 3\n"); });
  expect_contains(msg, "outside a section");
}

TEST(Config, InconsistentValuesNameEveryKey) {
  auto msg = config_error([] {
    Config c = from_toml("[model]\ndim = 192\nn_head = 6\nn_kv_head = 6\n[parallel]\ntensor_parallel_size = 4\n");
    validate_config(c, 4);
  });
  expect_contains(msg, "run.toml:3: [model] n_head = 6 (run.toml:3) is not divisible by [parallel] tensor_parallel_size = 4 (run.toml:6)");
  msg = config_error([] {
    Config c = from_toml("[model]\nn_head = 8\nn_kv_head = 3\n");
    validate_config(c, 1);
  });
  expect_contains(msg, "[model] n_head = 8 (run.toml:2) is not a multiple of [model] n_kv_head = 3 (run.toml:3)");
  msg = config_error([] {
    Config c;
    apply_set(c, "parallel.tensor_parallel_size=2");
    validate_config(c, 3);
  });
  expect_contains(msg, "world size 3 (mpirun -np) is not divisible by [parallel] tensor_parallel_size = 2 (--set parallel.tensor_parallel_size=2)");
  msg = config_error([] {
    Config c;
    apply_set(c, "precision.mode=fp16", "--fp16");
    validate_config(c, 1);
  });
  expect_contains(msg, "--fp16: [precision] mode = \"fp16\" (--fp16) cannot run with [train] device = \"cpu\"");
  expect_contains(msg, "use precision.mode=bf16 on CPU");
  msg = config_error([] {
    Config c = from_toml("[data]\nseq_len = 512\n[model]\nmax_seq_len = 256\n");
    validate_config(c, 1);
  });
  expect_contains(msg, "[data] seq_len = 512 (run.toml:2) is longer than [model] max_seq_len = 256");
  msg = config_error([] {
    Config c = from_toml("[model]\ndim = 100\nn_head = 8\n");
    validate_config(c, 1);
  });
  expect_contains(msg, "not divisible by [model] n_head = 8");
}

TEST(Config, EffectiveConfigRoundTrips) {
  Config c = from_toml("[model]\ndim = 128\nnorm_eps = 1e-6\n[train]\noutput_dir = \"out/x\"\n");
  apply_set(c, "train.learning_rate=0.001");
  std::string text = config_to_toml(c);
  expect_contains(text, "dim = 128");
  expect_contains(text, "# run.toml:2");
  Config d;
  apply_toml_string(d, text, "effective.toml");
  for (const auto& k : config_schema()) EXPECT_EQ(k.get(c), k.get(d)) << k.dotted();
}

TEST(Config, DidYouMean) {
  EXPECT_EQ(did_you_mean("n_heads", {"n_head", "n_layer", "dim"}), "n_head");
  EXPECT_EQ(did_you_mean("zzzzzz", {"n_head", "dim"}), "");
}

// ---- threads per rank (core/base/cpu.h) --------------------------------------------------------

// Bound to one core (as mpirun binds a rank by default), a rank defaults to one thread whatever
// the host has; unbound, to the host's cores shared among its ranks.
TEST(ThreadsPerRank, FollowTheAffinityMaskAndTheRanksOnTheHost) {
  cpu_set_t saved;
  ASSERT_EQ(sched_getaffinity(0, sizeof saved, &saved), 0);
  const int host = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
  EXPECT_EQ(andy::default_threads_per_rank(1), std::min(host, andy::cores_available()));
  int first = 0;
  while (!CPU_ISSET(first, &saved)) ++first;
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(first, &one);
  ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
  EXPECT_EQ(andy::cores_available(), 1);
  EXPECT_EQ(andy::default_threads_per_rank(1), 1);
  EXPECT_EQ(andy::default_threads_per_rank(4), 1);
  ASSERT_EQ(sched_setaffinity(0, sizeof saved, &saved), 0);
  EXPECT_EQ(andy::cores_available(), CPU_COUNT(&saved));
  EXPECT_EQ(andy::default_threads_per_rank(host * 2), 1);  // more ranks than cores: one each
}
