// End-to-end trainer tests through the real executable under mpirun: SIGTERM to one rank
// makes every rank write a checkpoint and the job exit 0; `--resume auto` then continues from
// it; a run whose latest checkpoint is truncated is refused with the file named.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "data/checksum.h"
#include "tests/data/data_test_util.h"
#include "tests/launch/run_command.h"

namespace fs = std::filesystem;
using namespace andy;
using namespace andy::testing_util;
namespace dt = andy::data::testing;

namespace {

// A tiny run config (vocab 100, dim 32, 2 layers, seq 16) over a generated dataset in `dir`.
std::string make_run(const dt::TempDir& dir, int64_t max_steps) {
  dt::write_file(dir / "tokenizer.model", "stand-in tokenizer for trainer e2e tests\n");
  std::string sum = data::file_checksum(dir / "tokenizer.model");
  if (!fs::exists(dir / "train")) {
    dt::make_split(dir.path(), "train", {3000}, 100, sum);
    dt::make_split(dir.path(), "validation", {600}, 100, sum);
  }
  std::string cfg = dir / "run.toml";
  dt::write_file(cfg, "[model]\ndim = 32\nn_layer = 2\nn_head = 4\nn_kv_head = 2\nvocab_size = 100\n"
                      "max_seq_len = 32\n[data]\ntrain_file = \"" + dir / "train" +
                          "\"\nval_file = \"" + dir / "validation" + "\"\ntokenizer_path = \"" +
                          dir / "tokenizer.model" + "\"\nseq_len = 16\nprefetch_batches = 0\n"
                          "[train]\noutput_dir = \"" + dir / "out" + "\"\nbatch_size = 4\n"
                          "max_steps = " + std::to_string(max_steps) +
                          "\nlog_interval = 1\neval_interval = 1000000\neval_batches = 2\n"
                          "intra_op_threads = 1\nwarmup_steps = 2\n"
                          "[checkpoint]\ninterval = 1000000\n");
  return cfg;
}

int count_lines(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  int n = 0;
  while (std::getline(f, line)) ++n;
  return n;
}

TEST(TrainE2e, SigtermOnOneRankWritesACheckpointAndExitsZero) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 1000000);
  std::string log = dir / "log.txt";
  std::string cmd = "exec " + mpirun(2) + andyllm_bin() + " train --config " + cfg + " > " + log + " 2>&1";
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Wait until training runs (two logged steps), then signal one rank (a child of mpirun).
  std::string metrics = dir / "out/metrics.jsonl";
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (count_lines(metrics) < 2 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_GE(count_lines(metrics), 2) << dt::read_text(log);
  auto ranks = run_command("pgrep -P " + std::to_string(pid));
  std::vector<pid_t> children;
  std::istringstream is(ranks.output);
  for (pid_t c; is >> c;) children.push_back(c);
  ASSERT_FALSE(children.empty()) << "no rank processes under mpirun " << pid;
  ASSERT_EQ(kill(children.back(), SIGTERM), 0);
  int status = 0;
  bool exited = false;
  deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) {
      exited = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (!exited) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
  }
  std::string out = dt::read_text(log);
  ASSERT_TRUE(exited) << "the job did not end within 60 s of SIGTERM:\n" << out;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << out;
  EXPECT_NE(out.find("stop requested (signal)"), std::string::npos) << out;
  std::string latest = dt::read_text(dir / "out/checkpoints/latest");
  ASSERT_FALSE(latest.empty()) << out;
  std::string step_dir = dir / ("out/checkpoints/" + latest.substr(0, latest.size() - 1));
  EXPECT_TRUE(fs::exists(step_dir + "/meta.json"));
  EXPECT_TRUE(fs::exists(step_dir + "/shard_tp00.pt"));
  std::printf("  SIGTERM to rank pid %d: exit %d, checkpoint %s\n", children.back(),
              WIFEXITED(status) ? WEXITSTATUS(status) : -1, step_dir.c_str());

  // Resume from it (auto) for two more steps, then damage the latest checkpoint: refused.
  int64_t stopped = std::stoll(latest.substr(5));
  std::string more = " --set train.max_steps=" + std::to_string(stopped + 2);
  auto r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg + more);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  std::string latest2 = dt::read_text(dir / "out/checkpoints/latest");
  std::string shard = dir / ("out/checkpoints/" + latest2.substr(0, latest2.size() - 1) + "/shard_tp00.pt");
  fs::resize_file(shard, fs::file_size(shard) / 3);
  r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg + " --set train.max_steps=" +
                  std::to_string(stopped + 4));
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(shard), std::string::npos) << r.output;
}

}  // namespace
