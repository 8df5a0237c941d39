// The andyllm command line as a user drives it: help, config errors (one line, file:line, key,
// expectation, non-zero exit), the effective config, and the collective timeout path.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "tests/launch/run_command.h"

using namespace andy::testing_util;
namespace fs = std::filesystem;

namespace {

void expect_contains(const std::string& text, const std::string& part) {
  EXPECT_NE(text.find(part), std::string::npos) << "'" << part << "' not in:\n" << text;
}

std::string write_temp_config(const std::string& name, const std::string& text) {
  fs::path dir = fs::temp_directory_path() / ("andyllm_cli_" + std::to_string(getpid()));
  fs::create_directories(dir);
  fs::path p = dir / name;
  std::ofstream(p) << text;
  return p.string();
}


// Issue: a wrong config was used silently (defaults trained): --config naming a directory, a
// config passed without --config, a second --config. Each is bad input: exit 2, one line.
TEST(Cli, AConfigThatCannotBeUsedIsAnErrorNotTheDefaults) {
  const std::string tiny = source_dir() + "/configs/tiny.toml";
  struct Case {
    std::string args, expect;
  };
  const std::vector<Case> cases = {
      {"train --config " + source_dir() + "/configs", "is a directory; expected a TOML file"},
      {"train " + tiny, "unexpected argument '" + tiny + "' (did you mean --config " + tiny + "?)"},
      {"train --config " + tiny + " --config " + tiny, "--config given 2 times"},
      {"generate stray --model x", "unexpected argument 'stray'"},
  };
  for (const auto& c : cases) {
    auto r = run_command(andyllm_bin() + " " + c.args + " --print-config");
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.output;
    EXPECT_EQ(count_of(r.output, c.expect), 1) << c.args << "\n" << r.output;
  }
}

}  // namespace

TEST(Cli, HelpDescribesSubcommandsAndFlags) {
  auto r = run_command(andyllm_bin() + " --help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* sub : {"train", "serve", "preprocess", "quantize", "export", "bench", "version"})
    expect_contains(r.output, std::string("  ") + sub);
  r = run_command(andyllm_bin() + " train --help");
  EXPECT_EQ(r.exit_code, 0);
  for (const char* flag : {"--config", "--set", "--train_file", "--val_file", "--tokenizer_path",
                           "--output_dir", "--device", "--batch_size", "--learning_rate",
                           "--num_epochs", "--gradient_accumulation_steps", "--fp16",
                           "--print_config", "--resume"})
    expect_contains(r.output, flag);
  r = run_command(andyllm_bin() + " trian");
  EXPECT_EQ(r.exit_code, 2);
  expect_contains(r.output, "did you mean 'train'?");
  r = run_command(andyllm_bin() + " train --bach_size 3");
  EXPECT_EQ(r.exit_code, 2);
  expect_contains(r.output, "unknown flag --bach_size (did you mean --batch_size?)");
}

TEST(Cli, PrintConfigShowsPrecedence) {
  std::string cfg = write_temp_config("p.toml", "[train]\nbatch_size = 4\nlearning_rate = 0.01\n");
  auto r = run_command(andyllm_bin() + " train --config " + cfg +
                       " --batch_size 6 --set train.seed=99 --print-config");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  expect_contains(r.output, "batch_size = 6");
  expect_contains(r.output, "# --batch_size");
  expect_contains(r.output, "learning_rate = 0.01");
  expect_contains(r.output, cfg + ":3");
  expect_contains(r.output, "seed = 99");
  r = run_command(andyllm_bin() + " train --help-config");
  EXPECT_EQ(r.exit_code, 0);
  expect_contains(r.output, "gradient_accumulation_steps (integer, default 1");
}

TEST(Cli, ShippedConfigsAreValid) {
  for (const auto& e : fs::directory_iterator(source_dir() + "/configs")) {
    if (e.path().extension() != ".toml") continue;
    auto r = run_command(andyllm_bin() + " train --config " + e.path().string() + " --print-config");
    EXPECT_EQ(r.exit_code, 0) << e.path() << "\n" << r.output;
  }
}

TEST(Cli, ConfigErrorsStopBeforeWorkWithOneLine) {
  struct Case {
    std::string toml, extra, expect;
  };
  std::vector<Case> cases = {
      {"[model]\nn_heads = 4\n", "", "p.toml:2: unknown key [model] n_heads (did you mean 'n_head'?)"},
      {"[train]\nbatch_size = \"big\"\n", "", "p.toml:2: [train] batch_size: expected an integer, got a string"},
      {"[train]\nlearning_rate = 50.0\n", "", "p.toml:2: [train] learning_rate = 50.0: out of range, expected 0 < value <= 10"},
      {"[model]\nn_head = 6\nn_kv_head = 6\ndim = 192\n", "--set parallel.tensor_parallel_size=4",
       "[model] n_head = 6 (" },
      {"[train]\nseed = 1\n", "--fp16", "cannot run with [train] device = \"cpu\""},
  };
  // On a machine without a GPU, --device cuda is a config error too (before anything is written).
  if (run_command(andyllm_bin() + " version").output.find("CPU only") != std::string::npos)
    cases.push_back({"[train]\nseed = 1\n", "--device cuda",
                     "[train] device = \"cuda\" (--device): no GPU is visible to this LibTorch (a CPU-only build)"});
  for (const auto& c : cases) {
    std::string cfg = write_temp_config("p.toml", c.toml);
    std::string out_dir = fs::path(cfg).parent_path().string() + "/never_written";
    auto r = run_command(andyllm_bin() + " train --config " + cfg + " " + c.extra +
                         " --output_dir " + out_dir);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    expect_contains(r.output, c.expect);
    EXPECT_EQ(count_of(r.output, "\n"), 1) << "expected exactly one line:\n" << r.output;
    EXPECT_FALSE(fs::exists(out_dir)) << "a failed config must not create the output directory";
  }
}

// bench train --profile: a step count below 1 is refused; a LibTorch without a C++-drivable trace
// profiler (1.13) refuses with what to use instead, before any work.
TEST(Cli, BenchTrainProfileFlagsAreCheckedFirst) {
  std::string cfg = write_temp_config("b.toml", "[train]\nseed = 1\n");
  std::string trace = fs::path(cfg).parent_path().string() + "/trace.json";
  auto r = run_command(andyllm_bin() + " bench train --config " + cfg + " --profile " + trace + " --profile_steps 0");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  expect_contains(r.output, "andyllm bench train: expected --profile_steps >= 1");
  if (run_command(andyllm_bin() + " version").output.find("libtorch  1.") != std::string::npos) {
    r = run_command(andyllm_bin() + " bench train --config " + cfg + " --profile " + trace);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    expect_contains(r.output, "has no trace profiler the C++ API can drive (2.1+ needed); on CPU use scripts/profile_train.sh");
    EXPECT_EQ(count_of(r.output, "\n"), 1) << "expected exactly one line:\n" << r.output;
  }
  EXPECT_FALSE(fs::exists(trace));
}

TEST(Cli, WorldSizeNotDivisibleIsReportedOnceByEveryRankAgreeing) {
  auto r = run_command(mpirun(3) + andyllm_bin() +
                       " train --set parallel.tensor_parallel_size=2 --output_dir /tmp/andyllm_never");
  EXPECT_NE(r.exit_code, 0);
  expect_contains(r.output, "world size 3 (mpirun -np) is not divisible by [parallel] tensor_parallel_size = 2 (--set parallel.tensor_parallel_size=2)");
  EXPECT_EQ(count_of(r.output, "is not divisible"), 1) << r.output;
}

TEST(Cli, CudaWithoutAGpuIsReportedOnceByEveryRankAgreeing) {
  if (run_command(andyllm_bin() + " version").output.find("CPU only") == std::string::npos)
    GTEST_SKIP() << "this LibTorch has CUDA";
  auto r = run_command(mpirun(2) + andyllm_bin() + " train --device cuda --output_dir /tmp/andyllm_never");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_of(r.output, "no GPU is visible"), 1) << r.output;
  EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << "an agreed config error needs no abort:\n" << r.output;
  EXPECT_FALSE(fs::exists("/tmp/andyllm_never"));
}

// Setup that fails on every rank (no tokenizer yet): one message, exit 2, no MPI_Abort, and no
// output directory (the effective config is written only once setup has succeeded; the
// trainer e2e tests check it is written then).
TEST(Cli, MissingDataIsReportedOnceAndWritesNothing) {
  fs::path out = fs::temp_directory_path() / ("andyllm_cli_out_" + std::to_string(getpid()));
  fs::remove_all(out);
  auto r = run_command(mpirun(2) + andyllm_bin() + " train --output_dir " + out.string() +
                       " --set data.tokenizer_path=/nonexistent/tokenizer.model");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_of(r.output, "run `andyllm preprocess` first"), 1) << r.output;
  expect_contains(r.output, "data.tokenizer_path = /nonexistent/tokenizer.model (--set data.tokenizer_path=");
  EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << "an agreed error needs no abort:\n" << r.output;
  EXPECT_FALSE(fs::exists(out)) << "a failed setup must not create the output directory";
}

TEST(Cli, CollectiveTimeoutAbortsTheJobWithAMessage) {
  // Rank 1 skips the first collective; rank 0 must give up after 2 s and end the whole job.
  auto r = run_command(mpirun(2) + andyllm_bin() +
                       " bench comm --max_bytes 64 --iters 1 --timeout 2 --debug_skip_rank 1");
  EXPECT_NE(r.exit_code, 0) << r.output;
  expect_contains(r.output, "[rank 0] error:");
  expect_contains(r.output, "collective all_reduce on world (group rank 0 of 2, world rank 0, mpi) did not complete within 2.0");
  EXPECT_EQ(r.output.find("was not aborted"), std::string::npos) << "the skipping rank was not ended:\n" << r.output;
}
