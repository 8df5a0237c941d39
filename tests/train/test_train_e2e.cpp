// End-to-end trainer tests through the real executable under mpirun: SIGTERM to one rank,
// Ctrl-C or SIGTERM to scripts/mpirun.sh, and SIGUSR1 to plain mpirun each make every rank write
// a checkpoint and the job exit 0; `--resume auto` then continues from it; a run whose latest
// checkpoint is truncated is refused with the file named; a rank killed with SIGKILL ends the
// job with an error and leaves the latest complete checkpoint usable; bf16 training of the demo
// corpus lowers the validation loss.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <map>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "data/checksum.h"
#include "tests/data/data_test_util.h"
#include "tests/launch/job.h"
#include "tests/launch/run_command.h"

namespace fs = std::filesystem;
using namespace andy;
using namespace andy::testing_util;
namespace dt = andy::data::testing;

namespace {

// A tiny run config (vocab 100, dim 32, 2 layers, seq 16) over a generated dataset in `dir`.
std::string make_run(const dt::TempDir& dir, int64_t max_steps, int64_t checkpoint_interval = 1000000) {
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
                          "[checkpoint]\ninterval = " + std::to_string(checkpoint_interval) + "\n");
  return cfg;
}

int count_lines(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  int n = 0;
  while (std::getline(f, line)) ++n;
  return n;
}

// Waits (up to 60 s) until `metrics` has at least `n` lines.
bool wait_logged_steps(const std::string& metrics, int n) {
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (count_lines(metrics) < n && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  return count_lines(metrics) >= n;
}

// "step_NNNNNNNN" recorded in the run's checkpoints/latest ("" if none).
std::string latest_checkpoint(const dt::TempDir& dir) {
  std::string latest = dt::read_text(dir / "out/checkpoints/latest");
  while (!latest.empty() && latest.back() == '\n') latest.pop_back();
  return latest;
}

// Checks that the job stopped on a signal with a complete checkpoint and exit code 0.
void expect_clean_stop(Job& job, const dt::TempDir& dir, const std::string& what) {
  ASSERT_TRUE(job.wait_exit(60)) << "the job did not end within 60 s of " << what << ":\n"
                                 << job.output();
  std::string out = job.output();
  EXPECT_EQ(job.exit_code(), 0) << what << "\n" << out;
  EXPECT_NE(out.find("stop requested (signal)"), std::string::npos) << out;
  std::string latest = latest_checkpoint(dir);
  ASSERT_FALSE(latest.empty()) << out;
  std::string step_dir = dir / ("out/checkpoints/" + latest);
  EXPECT_TRUE(fs::exists(step_dir + "/meta.json"));
  EXPECT_TRUE(fs::exists(step_dir + "/shard_tp00.pt"));
  std::printf("  %s: exit %d, checkpoint %s\n", what.c_str(), job.exit_code(), step_dir.c_str());
}

// Who gets the signal: given the job's pid, the pid to signal (negative: a process group).
using Target = std::function<pid_t(pid_t)>;
pid_t last_rank(pid_t mpirun_pid) {
  std::vector<pid_t> ranks = children_of(mpirun_pid);
  return ranks.empty() ? 0 : ranks.back();
}

// Starts `launcher` training the run of `dir` (config `cfg`), waits until it has logged two
// steps, sends `sig` to `target`, and expects every rank to checkpoint and the job to exit 0.
void signal_and_expect_clean_stop(const dt::TempDir& dir, const std::string& cfg,
                                  const std::string& launcher, int sig, const Target& target,
                                  const std::string& what) {
  Job job(launcher + " train --config " + cfg, dir / "log.txt");
  ASSERT_GT(job.pid, 0);
  ASSERT_TRUE(wait_logged_steps(dir / "out/metrics.jsonl", 2)) << job.output();
  pid_t to = target(job.pid);
  ASSERT_NE(to, 0) << "no process to signal under " << job.pid;
  ASSERT_EQ(kill(to, sig), 0);
  expect_clean_stop(job, dir, what);
}

std::string plain_mpirun() { return mpirun(2) + andyllm_bin(); }
// `exec env ... script`: the job's pid is the script's bash.
std::string launcher_script() {
  return "env ANDYLLM_BIN=" + andyllm_bin() + " " + source_dir() + "/scripts/mpirun.sh 2";
}

TEST(TrainE2e, SigtermOnOneRankWritesACheckpointAndExitsZero) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 1000000);
  signal_and_expect_clean_stop(dir, cfg, plain_mpirun(), SIGTERM, last_rank, "SIGTERM to one rank");
  if (::testing::Test::HasFatalFailure()) return;
  std::string latest = latest_checkpoint(dir);

  // Resume from it (auto) for two more steps, then damage the latest checkpoint: refused.
  int64_t stopped = std::stoll(latest.substr(5));
  std::string more = " --set train.max_steps=" + std::to_string(stopped + 2);
  auto r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg + more);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
  // A budget the checkpoint has already reached: said, nothing trained, exit 0.
  r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg + " --set train.max_steps=" +
                  std::to_string(stopped));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("nothing to train"), std::string::npos) << r.output;
  std::string shard = dir / ("out/checkpoints/" + latest_checkpoint(dir) + "/shard_tp00.pt");
  fs::resize_file(shard, fs::file_size(shard) / 3);
  r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg + " --set train.max_steps=" +
                  std::to_string(stopped + 4));
  // Found at setup by its recorded checksum, before anything is written: one message naming it,
  // exit 2 (damaged input), no abort, config.toml untouched.
  const std::string config_before = dt::read_text(dir / "out/config.toml");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_of(r.output, shard + " is damaged: checksum"), 1) << r.output;
  EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << r.output;
  EXPECT_EQ(dt::read_text(dir / "out/config.toml"), config_before);
  // A resume with another model is refused the same way and leaves config.toml as it was.
  fs::resize_file(shard, 0);
  r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg + " --set model.dim=64 --set train.max_steps=" +
                  std::to_string(stopped + 4));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_of(r.output, "holds another model: [model] dim = 32 there, 64 here"), 1) << r.output;
  EXPECT_EQ(dt::read_text(dir / "out/config.toml"), config_before) << "a refused resume rewrote config.toml";
}

// A setup step that fails on rank 0 only (it alone creates output_dir, here under a regular
// file): the ranks agree, so the job reports it once and exits 1 on every rank, not MPI_Abort;
// a bad --resume path is bad input (exit 2). A run that starts writes its effective config
// into output_dir.
TEST(TrainE2e, OutputDirFailureOnRankZeroIsAgreedAndASuccessfulRunWritesItsConfig) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 1);
  dt::write_file(dir / "blocker", "a file, not a directory\n");
  std::string bad = dir / "blocker/out";
  auto r = run_command(plain_mpirun() + " train --config " + cfg + " --output_dir " + bad);
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(count_of(r.output, "cannot create it"), 1) << r.output;
  EXPECT_NE(r.output.find("[train] output_dir = " + bad), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << r.output;

  // A --resume path that does not exist: bad input, found during setup, nothing written.
  std::string nope = dir / "no_such_checkpoint";
  r = run_command(plain_mpirun() + " train --config " + cfg + " --resume " + nope);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_of(r.output, "--resume " + nope + ": not a directory"), 1) << r.output;
  EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << r.output;
  EXPECT_FALSE(fs::exists(dir / "out")) << "a failed setup must not create the output directory";

  r = run_command(plain_mpirun() + " train --config " + cfg + " --set train.seed=5");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream in(dir / "out/config.toml");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("seed = 5"), std::string::npos) << text;
  EXPECT_NE(text.find("max_steps = 1"), std::string::npos) << text;
}

// Ctrl-C in a terminal: SIGINT to the launcher's whole process group. scripts/mpirun.sh turns
// it into SIGUSR1 for mpirun, which forwards it to every rank.
TEST(TrainE2e, CtrlCToTheLauncherScriptCheckpointsAndExitsZero) {
  dt::TempDir dir("andyllm-train-e2e");
  signal_and_expect_clean_stop(dir, make_run(dir, 1000000), launcher_script(), SIGINT,
                               [](pid_t job) { return -job; },
                               "SIGINT to the process group of scripts/mpirun.sh");
  EXPECT_NE(dt::read_text(dir / "log.txt").find("[mpirun.sh] SIGINT"), std::string::npos);
}

// SLURM-style preemption of a job launched by the script: SIGTERM to the script alone.
TEST(TrainE2e, SigtermToTheLauncherScriptCheckpointsAndExitsZero) {
  dt::TempDir dir("andyllm-train-e2e");
  signal_and_expect_clean_stop(dir, make_run(dir, 1000000), launcher_script(), SIGTERM,
                               [](pid_t job) { return job; }, "SIGTERM to scripts/mpirun.sh");
}

// Plain mpirun forwards SIGUSR1 to every rank at once.
TEST(TrainE2e, SigusrToPlainMpirunCheckpointsAndExitsZero) {
  dt::TempDir dir("andyllm-train-e2e");
  signal_and_expect_clean_stop(dir, make_run(dir, 1000000), plain_mpirun(), SIGUSR1,
                               [](pid_t job) { return job; }, "SIGUSR1 to mpirun");
}

// A rank that dies mid-training ends the job with an error (no hang), and the latest complete
// checkpoint stays usable.
TEST(TrainE2e, ARankThatDiesEndsTheJobWithAnError) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 1000000, /*checkpoint_interval=*/3);
  Job job(mpirun(2) + andyllm_bin() + " train --config " + cfg, dir / "log.txt");
  ASSERT_GT(job.pid, 0);
  ASSERT_TRUE(wait_logged_steps(dir / "out/metrics.jsonl", 5)) << job.output();
  std::vector<pid_t> ranks = children_of(job.pid);
  ASSERT_FALSE(ranks.empty()) << "no rank processes under mpirun " << job.pid;
  ASSERT_EQ(kill(ranks.back(), SIGKILL), 0);
  ASSERT_TRUE(job.wait_exit(60)) << "the job still runs 60 s after a rank was killed:\n"
                                 << job.output();
  std::string out = job.output();
  EXPECT_NE(job.exit_code(), 0) << out;
  EXPECT_NE(out.find("signal 9"), std::string::npos) << "mpirun should name the killed rank:\n" << out;
  std::printf("  SIGKILL to rank pid %d: job exit %d\n", ranks.back(), job.exit_code());

  // The latest complete checkpoint resumes (a save cut short by the kill is never "latest").
  std::string latest = latest_checkpoint(dir);
  ASSERT_FALSE(latest.empty()) << out;
  int64_t at = std::stoll(latest.substr(5));
  auto r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg +
                       " --set train.max_steps=" + std::to_string(at + 1));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
}

// The built-in demo in bf16: corpus from Debian's fortunes (scripts/make_demo_corpus.sh),
// `andyllm preprocess`, then configs/tiny.toml on 2 ranks with precision.mode = bf16 for 60
// steps. The validation loss must fall clearly below the untrained model's (ln 4096 = 8.3).
TEST(TrainE2e, Bf16TrainsOnTheDemoCorpus) {
  dt::TempDir dir("andyllm-train-demo");
  auto r = run_command(source_dir() + "/scripts/make_demo_corpus.sh " + dir / "raw");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_command(andyllm_bin() + " preprocess --input_dir " + dir / "raw" + " --output_dir " +
                  dir / "processed" + " --vocab_size 4096");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::string data = dir / "processed";
  r = run_command(mpirun(2) + andyllm_bin() + " train --config " + source_dir() + "/configs/tiny.toml" +
                  " --set data.train_file=" + data + "/train --set data.val_file=" + data +
                  "/validation --set data.tokenizer_path=" + data + "/tokenizer.model" +
                  " --set precision.mode=bf16 --set train.max_steps=60 --set train.warmup_steps=10"
                  " --set train.eval_interval=30 --set checkpoint.interval=1000 --output_dir " +
                  dir / "out");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // {"step": N, "val_loss": X, ...} lines of metrics.jsonl.
  std::vector<std::pair<int, double>> val;
  std::ifstream f(dir / "out/metrics.jsonl");
  for (std::string line; std::getline(f, line);) {
    auto at = line.find("\"val_loss\": ");
    if (at == std::string::npos) continue;
    val.push_back({std::stoi(line.substr(line.find("\"step\": ") + 8)), std::stod(line.substr(at + 12))});
  }
  ASSERT_EQ(val.size(), 3u) << r.output;  // steps 0, 30, 60
  EXPECT_EQ(val.front().first, 0);
  EXPECT_EQ(val.back().first, 60);
  EXPECT_LT(val[1].second, val[0].second);
  EXPECT_LT(val.back().second, val[0].second - 1.5) << r.output;
  std::printf("  bf16 on the demo corpus: val_loss %.3f (step 0) -> %.3f (30) -> %.3f (60)\n",
              val[0].second, val[1].second, val[2].second);
}


// Issue: checkpoints of an earlier run in output_dir. A fresh run over them is refused (exit 2,
// nothing touched); a run resumed from an older step never prunes what it just wrote nor the
// later steps; best_model is replaced only by a better model; checkpoint.existing=archive moves
// the old run aside.
TEST(TrainE2e, EarlierRunsCheckpointsAreNeverLost) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 6);
  const std::string bin = andyllm_bin() + " train --config " + cfg +
                          " --set checkpoint.interval=2 --set checkpoint.keep_last=2"
                          " --set train.eval_interval=2";
  const std::string ck = dir / "out/checkpoints";
  auto r = run_command(bin + " --set train.max_steps=6");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(latest_checkpoint(dir), "step_00000006");
  EXPECT_TRUE(fs::exists(ck + "/step_00000004/meta.json"));
  const std::string best_meta = dir / "out/best_model/meta.json";
  ASSERT_TRUE(fs::exists(best_meta)) << r.output;
  auto best_loss = [&] {
    std::string t = dt::read_text(best_meta);
    return std::stod(t.substr(t.find("\"val_loss\": ") + 12));
  };
  const double best_before = best_loss();

  // The repro of the data loss: a fresh run into the same output_dir.
  for (const std::string how : {" --resume none", ""}) {
    if (how.empty()) fs::remove(ck + "/latest");  // auto, with `latest` deleted
    r = run_command(bin + " --set train.max_steps=3" + how);
    EXPECT_EQ(r.exit_code, 2) << how << "\n" << r.output;
    EXPECT_NE(r.output.find("already holds an earlier run: 2 checkpoint(s) step_00000004 .. step_00000006"),
              std::string::npos) << r.output;
    EXPECT_NE(r.output.find("checkpoint.existing=archive"), std::string::npos) << r.output;
    EXPECT_TRUE(fs::exists(ck + "/step_00000004/meta.json"));
    EXPECT_TRUE(fs::exists(ck + "/step_00000006/meta.json"));
  }
  dt::write_file(ck + "/latest", "step_00000006\n");

  // Resumed from the older step 4 for one step: step 5 is written and is latest, step 6 is
  // kept, and the better best_model of the later run stays.
  r = run_command(bin + " --set train.max_steps=5 --resume " + ck + "/step_00000004");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("holds 1 checkpoint(s) after step 4"), std::string::npos) << r.output;
  EXPECT_EQ(latest_checkpoint(dir), "step_00000005");
  EXPECT_TRUE(fs::exists(ck + "/step_00000005/meta.json")) << r.output;
  EXPECT_TRUE(fs::exists(ck + "/step_00000006/meta.json")) << r.output;
  EXPECT_LE(best_loss(), best_before);
  r = run_command(bin + " --set train.max_steps=5");  // auto: the latest (5) resumes
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("nothing to train"), std::string::npos) << r.output;

  // Archive: the old run moves under out/archive/, the new one starts clean.
  r = run_command(bin + " --set train.max_steps=2 --resume none --set checkpoint.existing=archive");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("moved the earlier run's"), std::string::npos) << r.output;
  EXPECT_EQ(latest_checkpoint(dir), "step_00000002");
  EXPECT_FALSE(fs::exists(ck + "/step_00000006"));
  int archived = 0;
  for (const auto& e : fs::directory_iterator(dir / "out/archive"))
    archived += fs::exists(e.path() / "checkpoints/step_00000006/meta.json") &&
                fs::exists(e.path() / "best_model/model.pt");
  EXPECT_EQ(archived, 1);
}


// Issue: throughput, MFU and comm-wait figures exceeded their bounds ("MFU 245 %") when
// checkpoints or evaluations came more often than progress lines. bf16 too: its MFU is quoted
// against the measured bf16 matmul rate (against the fp32 rate it read 135 %).
TEST(TrainE2e, ProgressFiguresStayInBoundsWithFrequentSavesAndEvaluations) {
  for (const std::string mode : {"fp32", "bf16"}) {
    SCOPED_TRACE(mode);
    dt::TempDir dir("andyllm-train-e2e");
    std::string cfg = make_run(dir, 8);
    auto r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg +
                         " --set train.log_interval=4 --set checkpoint.interval=1 --set train.eval_interval=1" +
                         " --set precision.mode=" + mode);
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find("measured " + mode + " matmul rate"), std::string::npos) << r.output;
    int rows = 0;
    std::ifstream f(dir / "out/metrics.jsonl");
    for (std::string line; std::getline(f, line);) {
      auto j = nlohmann::json::parse(line);
      if (!j.contains("mfu")) continue;
      ++rows;
      EXPECT_GT(j["tokens_per_sec"].get<double>(), 0) << line;
      EXPECT_LE(j["mfu"].get<double>(), 1.0) << line;
      EXPECT_GE(j["comm_wait_share"].get<double>(), 0.0) << line;
      EXPECT_LE(j["comm_wait_share"].get<double>(), 1.0) << line;
    }
    EXPECT_EQ(rows, 2);
  }
}


// `bench train` writes nothing into the output_dir, so it runs on a config whose output_dir
// holds a finished run (README: train, then bench train the same config) and leaves it as it was.
TEST(TrainE2e, BenchTrainRunsBesideAnEarlierRunAndLeavesItAlone) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 4, /*checkpoint_interval=*/2);
  auto r = run_command(mpirun(1) + andyllm_bin() + " train --config " + cfg);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const int rows = count_lines(dir / "out/metrics.jsonl");
  const std::string latest = dt::read_text(dir / "out/checkpoints/latest");
  auto b = run_command(mpirun(1) + andyllm_bin() + " bench train --config " + cfg + " --steps 3 --warmup 1");
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_NE(b.output.find("tokens/s"), std::string::npos) << b.output;
  // MFU against the matmul rate measured before and after the steps (their mean).
  EXPECT_NE(b.output.find("MFU vs measured"), std::string::npos) << b.output;
  EXPECT_NE(b.output.find(" before the steps, "), std::string::npos) << b.output;
  EXPECT_EQ(count_lines(dir / "out/metrics.jsonl"), rows);
  EXPECT_EQ(dt::read_text(dir / "out/checkpoints/latest"), latest);
  EXPECT_FALSE(fs::exists(dir / "out/archive"));
  // A real second run there is still refused.
  auto again = run_command(mpirun(1) + andyllm_bin() + " train --config " + cfg + " --resume none");
  EXPECT_NE(again.exit_code, 0);
  EXPECT_NE(again.output.find("already holds an earlier run"), std::string::npos) << again.output;
}

// Issue: two runs into one output_dir both ran. The second is refused naming the first's host
// and PID; the lock dies with the process, so after a kill the run resumes.
TEST(TrainE2e, ASecondRunIntoTheSameOutputDirIsRefusedWhileTheFirstLives) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 1000000, /*checkpoint_interval=*/2);
  Job first(mpirun(2) + andyllm_bin() + " train --config " + cfg, dir / "log.txt");
  ASSERT_GT(first.pid, 0);
  ASSERT_TRUE(wait_logged_steps(dir / "out/metrics.jsonl", 4)) << first.output();
  // Through mpirun, as the README launches training: Open MPI 4.1's singleton start (orted
  // spawned by MPI_Init) was seen here to stall in MPI_Init for minutes, about one start in
  // two, while another job's ranks are busy (docs/DEPENDENCIES.md).
  auto r = run_command(mpirun(1) + andyllm_bin() + " train --config " + cfg);
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_of(r.output, "is in use by another run (host "), 1) << r.output;
  EXPECT_NE(r.output.find(", pid "), std::string::npos) << r.output;
  std::vector<pid_t> ranks = children_of(first.pid);
  ASSERT_FALSE(ranks.empty());
  // The whole job dies at once, as under a scheduler's kill or a node failure: mpirun's process
  // group and every rank. (With mpirun's group alone killed, one rank was seen running on at
  // full CPU for 36 s, and once past ctest's 400 s: that is not what this test is about.)
  ASSERT_EQ(kill(-first.pid, SIGKILL), 0);
  for (pid_t r : ranks) kill(r, SIGKILL);
  ASSERT_TRUE(first.wait_exit(30));
  for (pid_t r : ranks) EXPECT_TRUE(wait_gone(r, 30)) << "rank " << r << " still runs 30 s after SIGKILL";
  std::string latest = latest_checkpoint(dir);
  ASSERT_FALSE(latest.empty());
  r = run_command(andyllm_bin() + " train --config " + cfg + " --set train.max_steps=" +
                  std::to_string(std::stoll(latest.substr(5)) + 1));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
}

// Issue: metrics.jsonl after a resume repeated steps. Resumed from step 4 of a run that reached
// 8, the file holds each step once.
TEST(TrainE2e, MetricsAfterAResumeHoldEachStepOnce) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 8, /*checkpoint_interval=*/4);
  auto r = run_command(andyllm_bin() + " train --config " + cfg + " --set checkpoint.keep_last=5");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = run_command(andyllm_bin() + " train --config " + cfg + " --resume " + dir / "out/checkpoints/step_00000004");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::map<int, int> rows;
  std::ifstream f(dir / "out/metrics.jsonl");
  for (std::string line; std::getline(f, line);) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) ++rows[j["step"].get<int>()];
  }
  ASSERT_EQ(rows.size(), 8u);
  for (const auto& [step, n] : rows) EXPECT_EQ(n, 1) << "step " << step;
}


// Issue: train never checked the manifest's shard checksums (a flipped bit trained silently).
TEST(TrainE2e, ACorruptShardIsRefusedBeforeTrainingNamingIt) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 2);
  std::string shard = dir / "train/shard-00000-00000.h5";
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(shard) * 2 / 3));
    f.put('\x55');
  }
  auto r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg);
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_EQ(count_of(r.output, shard + ": checksum"), 1) << r.output;
  EXPECT_FALSE(fs::exists(dir / "out")) << "nothing may be written";
}


// Issue: a full disk during a save aborted the process (rc 134) and left a partial step_N.tmp/
// keeping the disk full. On a real full file system (a small tmpfs; needs root, as CI runs):
// an agreed I/O error naming the path and the free space, exit 1 on every rank, no temporary
// left, and `latest` still a complete checkpoint that resumes elsewhere.
TEST(TrainE2e, AFullDiskFailsTheSaveCleanly) {
  dt::TempDir dir("andyllm-train-e2e");
  std::string cfg = make_run(dir, 40, /*checkpoint_interval=*/2);
  const std::string small = dir / "small";
  fs::create_directories(small);
  // One checkpoint of this model takes about 300 kB, the best_model about 100 kB.
  if (run_command("mount -t tmpfs -o size=900k tmpfs " + small).exit_code != 0)
    GTEST_SKIP() << "cannot mount a tmpfs here (not root?)";
  struct Unmount {
    std::string at;
    ~Unmount() { run_command("umount " + at); }
  } unmount{small};
  auto r = run_command(mpirun(2) + andyllm_bin() + " train --config " + cfg + " --output_dir " + small +
                       "/out --set checkpoint.keep_last=5 --set train.eval_interval=2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_EQ(count_of(r.output, "MiB free on " + small), 1) << r.output;
  EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("terminate called"), std::string::npos) << r.output;
  for (const auto& e : fs::recursive_directory_iterator(small))
    EXPECT_EQ(e.path().string().find(".tmp"), std::string::npos) << "left behind: " << e.path();
  std::string latest = dt::read_text(small + "/out/checkpoints/latest");
  while (!latest.empty() && latest.back() == '\n') latest.pop_back();
  ASSERT_FALSE(latest.empty()) << r.output;
  const std::string ckpt = small + "/out/checkpoints/" + latest;
  EXPECT_TRUE(fs::exists(ckpt + "/meta.json"));
  if (fs::exists(small + "/out/best_model/model.pt")) {
    EXPECT_GT(fs::file_size(small + "/out/best_model/model.pt"), 0u);
  }
  // The latest checkpoint resumes (copied off the full disk).
  fs::copy(small + "/out", dir / "copy", fs::copy_options::recursive);
  fs::remove(dir / "copy/.lock");
  r = run_command(andyllm_bin() + " train --config " + cfg + " --output_dir " + dir / "copy" +
                  " --set train.max_steps=" + std::to_string(std::stoll(latest.substr(5)) + 1));
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("resumed from"), std::string::npos) << r.output;
}

}  // namespace
