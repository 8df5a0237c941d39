// Fault tests through the executable (ctest label `fault`; docs/RELIABILITY.md lists every
// fault class and where it is tested): here, preprocessing onto a full file system. The
// trainer's faults (full disk, kills, corrupt shards and checkpoints, divergence, a second run
// in one directory) are in tests/train, the engine's (a killed rank, bad input) in tests/serve;
// both carry the `fault` label too.
#include <gtest/gtest.h>

#include <filesystem>

#include "tests/data/data_test_util.h"
#include "tests/launch/job.h"
#include "tests/launch/run_command.h"

namespace fs = std::filesystem;
using namespace andy::testing_util;
namespace dt = andy::data::testing;

namespace {

// A tmpfs of `size` mounted at `at` for the test's life (needs root; CI runs as root).
struct SmallDisk {
  std::string at;
  bool mounted = false;
  SmallDisk(const std::string& dir, const std::string& size) : at(dir) {
    fs::create_directories(at);
    mounted = run_command("mount -t tmpfs -o size=" + size + " tmpfs " + at).exit_code == 0;
  }
  ~SmallDisk() {
    if (mounted) run_command("umount " + at);
  }
};

// Issue: `andyllm preprocess` on a full disk printed the HDF5 error and then crashed at exit
// (rc 139, HDF5's atexit handler closing the failed file again). Now: exit 1, the file and the
// reason named, and no dataset passed off as whole (no manifest.json).
TEST(Faults, PreprocessOntoAFullDiskFailsCleanly) {
  dt::TempDir dir("andyllm-fault");
  auto corpus = run_command(source_dir() + "/scripts/make_demo_corpus.sh " + dir / "raw");
  ASSERT_EQ(corpus.exit_code, 0) << corpus.output;
  int failures = 0;
  for (const std::string size : {"1m", "3m", "4m"}) {  // fails in sentencepiece input, shards, flush
    SmallDisk disk(dir / ("disk" + size), size);
    if (!disk.mounted) GTEST_SKIP() << "cannot mount a tmpfs here (not root?)";
    auto r = run_command(andyllm_bin() + " preprocess --input_dir " + dir / "raw" + " --output_dir " +
                         disk.at + "/out --vocab_size 4096");
    std::printf("  tmpfs %s: exit %d\n", size.c_str(), r.exit_code);
    EXPECT_NE(r.exit_code, 139) << "crashed\n" << r.output;
    if (r.exit_code == 0) continue;  // it fit after all
    ++failures;
    EXPECT_EQ(r.exit_code, 1) << size << "\n" << r.output;
    EXPECT_TRUE(r.output.find("No space left on device") != std::string::npos ||
                r.output.find("disk full") != std::string::npos) << r.output;
    EXPECT_FALSE(fs::exists(disk.at + "/out/manifest.json")) << "an incomplete dataset looks complete";
  }
  EXPECT_GT(failures, 0) << "no size was small enough to fail";

  // Shards of 50,000 tokens written on their own thread while the next fill (--threads 2): the
  // write that meets the full disk ends the run the same way.
  SmallDisk disk(dir / "disk-shards", "3m");
  auto r = run_command(andyllm_bin() + " preprocess --input_dir " + dir / "raw" + " --output_dir " + disk.at +
                       "/out --vocab_size 4096 --threads 2 --shard_tokens 50000");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_TRUE(r.output.find("No space left on device") != std::string::npos ||
              r.output.find("disk full") != std::string::npos) << r.output;
  EXPECT_NE(r.output.find("shard-00000-"), std::string::npos) << "the file is named\n" << r.output;
  EXPECT_EQ(r.output.find("HDF5-DIAG"), std::string::npos) << "HDF5's own printing is off on every thread\n"
                                                           << r.output;
  EXPECT_FALSE(fs::exists(disk.at + "/out/manifest.json")) << "an incomplete dataset looks complete";
}


// Issue: a killed preprocess left its temporary files, and train then said only "holds no .h5
// shard". Now train names the unfinished preprocess, and the next preprocess run cleans it up
// without --overwrite.
TEST(Faults, AKilledPreprocessIsNamedAndCleanedByTheNextRun) {
  dt::TempDir dir("andyllm-fault");
  auto corpus = run_command(source_dir() + "/scripts/make_demo_corpus.sh " + dir / "raw");
  ASSERT_EQ(corpus.exit_code, 0) << corpus.output;
  const std::string out = dir / "data";
  const std::string cmd = andyllm_bin() + " preprocess --input_dir " + dir / "raw" + " --output_dir " + out +
                          " --vocab_size 4096";
  {
    Job job(cmd, dir / "pre.log");
    ASSERT_GT(job.pid, 0);
    for (int i = 0; i < 200 && !fs::exists(out + "/.preprocess-tmp"); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ASSERT_EQ(kill(-job.pid, SIGKILL), 0);
    ASSERT_TRUE(job.wait_exit(30));
  }
  if (fs::exists(out + "/manifest.json")) GTEST_SKIP() << "preprocess finished before it could be killed";
  ASSERT_TRUE(fs::exists(out + "/.preprocess-tmp"));
  auto r = run_command(andyllm_bin() + " train --train_file " + out + "/train --output_dir " + dir / "run");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_EQ(count_of(r.output, "did not finish (its .preprocess-tmp/ is still there)"), 1) << r.output;
  r = run_command(cmd);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("holds an unfinished run"), std::string::npos) << r.output;
  EXPECT_TRUE(fs::exists(out + "/manifest.json"));
  EXPECT_FALSE(fs::exists(out + "/.preprocess-tmp"));
}

}  // namespace
