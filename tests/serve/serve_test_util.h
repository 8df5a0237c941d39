// What the serving e2e tests share: a small corpus with its tokenizer and shards, tiny models
// trained on it by the real executable (`andyllm preprocess`, `andyllm train`), and a server
// started in the background whose printed port is read back.
#pragma once

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "tests/data/data_test_util.h"
#include "tests/launch/job.h"
#include "tests/launch/run_command.h"

namespace andy::testing_util {

// Writes dir/raw/corpus.txt (documents of 5 lines over a 30-word vocabulary) and preprocesses it
// into dir/data (vocab 300: tokenizer.model, train/, validation/).
inline void prepare_tiny_corpus(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string raw = dir + "/raw";
  fs::create_directories(raw);
  std::mt19937 rng(3);
  const std::vector<std::string> words = {"the", "cat", "sat", "on", "a", "mat", "dog", "ran", "to",
                                          "house", "big", "small", "red", "blue", "tree", "under",
                                          "quick", "brown", "fox", "jumps", "over", "lazy", "bird",
                                          "sings", "in", "morning", "light", "river", "flows", "down"};
  std::ofstream f(raw + "/corpus.txt");
  for (int line = 0; line < 3000; ++line) {
    for (int w = 0; w < 12; ++w) f << (w ? " " : "") << words[rng() % words.size()];
    f << (line % 5 == 4 ? ".\n\n" : ".\n");
  }
  f.close();
  auto r = run_command(andyllm_bin() + " preprocess --input_dir " + raw + " --output_dir " + dir +
                       "/data --vocab_size 300 --txt_docs blank_lines");
  ASSERT_EQ(r.exit_code, 0) << r.output;
}

// Trains a tiny model (dim 32, 2 layers, context 64) for 6 steps at TP = tp into dir/name.
inline void train_tiny(const std::string& dir, const std::string& name, int tp) {
  const std::string d = dir + "/data";
  const std::string cfg = dir + "/" + name + ".toml";
  andy::data::testing::write_file(
      cfg, "[model]\ndim = 32\nn_layer = 2\nn_head = 4\nn_kv_head = 4\nvocab_size = 300\n"
           "max_seq_len = 64\ntie_embeddings = false\n[data]\ntrain_file = \"" + d + "/train\"\n"
           "val_file = \"" + d + "/validation\"\ntokenizer_path = \"" + d + "/tokenizer.model\"\n"
           "seq_len = 32\n[train]\noutput_dir = \"" + dir + "/" + name + "\"\nbatch_size = 4\n"
           "max_steps = 6\nlearning_rate = 3e-3\nwarmup_steps = 1\nlog_interval = 3\n"
           "eval_interval = 3\neval_batches = 1\nintra_op_threads = 1\n"
           "[parallel]\ntensor_parallel_size = " + std::to_string(tp) + "\n");
  auto r = run_command(mpirun(tp) + andyllm_bin() + " train --config " + cfg);
  ASSERT_EQ(r.exit_code, 0) << r.output;
}

// The port `andyllm serve` printed ("ready at ... (port N)"), waiting for it while the job runs;
// -1 when the job ended first or nothing was printed within `seconds`.
inline int wait_for_server_port(Job& job, int seconds) {
  const std::regex ready(R"(ready at http://[^ ]+ \(port (\d+)\))");
  for (int i = 0; i < seconds * 10; ++i) {
    std::smatch m;
    const std::string out = job.output();
    if (std::regex_search(out, m, ready)) return std::stoi(m[1]);
    int status = 0;
    if (waitpid(job.pid, &status, WNOHANG) == job.pid) {
      job.status = status;
      job.pid = -1;
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return -1;
}

}  // namespace andy::testing_util
