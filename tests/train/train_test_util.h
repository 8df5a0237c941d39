// Helpers for the trainer tests: a tiny dataset shared by every rank (written by rank 0 into a
// temporary directory whose path is broadcast), a tiny run config, grids built from
// MPI_COMM_WORLD, and comparisons that print their largest difference.
#pragma once

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "data/checksum.h"
#include "launch/trainer.h"
#include "parallel/mpi_communicator.h"
#include "tests/data/data_test_util.h"
#include "tests/model/model_test_util.h"

namespace andy::train_test {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
inline int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

inline std::string bcast_string(std::string s) {
  int n = static_cast<int>(s.size());
  MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
  s.resize(n);
  MPI_Bcast(s.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
  return s;
}

// The dataset (train + validation splits of a token stream with vocab 100, a stand-in
// tokenizer file whose checksum the shards carry). Made once per process, by rank 0.
struct Dataset {
  std::string root;
};
inline const Dataset& dataset() {
  static data::testing::TempDir* dir = nullptr;
  static Dataset ds;
  if (ds.root.empty()) {
    std::string path;
    if (world_rank() == 0) {
      dir = new data::testing::TempDir("andyllm-train");
      path = dir->path();
      data::testing::write_file(path + "/tokenizer.model", "stand-in tokenizer for trainer tests\n");
      std::string sum = data::file_checksum(path + "/tokenizer.model");
      data::testing::make_split(path, "train", {1500, 1500}, 100, sum);
      data::testing::make_split(path, "validation", {600}, 100, sum);
    }
    ds.root = bcast_string(path);
  }
  return ds;
}

// Tiny model (dim 64, 2 layers, vocab 100), seq 16, fp32, no sample, a fresh output dir.
inline Config tiny_run(const std::string& out_tag, int64_t steps = 5) {
  Config c;
  c.model = test::tiny_config(true);
  const auto& ds = dataset();
  c.data.train_file = ds.root + "/train";
  c.data.val_file = ds.root + "/validation";
  c.data.tokenizer_path = ds.root + "/tokenizer.model";
  c.data.seq_len = 16;
  c.data.prefetch_batches = 0;
  c.train.output_dir = ds.root + "/runs/" + out_tag;
  c.train.batch_size = 8;
  c.train.max_steps = steps;
  c.train.learning_rate = 1e-2;
  c.train.min_learning_rate = 1e-3;
  c.train.warmup_steps = 2;
  c.train.log_interval = 1;
  c.train.eval_interval = 1000;
  c.train.eval_batches = 2;
  c.train.intra_op_threads = 1;
  // Adam divides by sqrt(v) + eps: with the default 1e-8 a gradient at roundoff level (a token
  // never seen) gets a full lr-sized step whose sign is noise; 1e-5 keeps those steps small.
  c.train.adam_eps = 1e-5;
  c.checkpoint.interval = 1000;
  c.checkpoint.resume = "none";
  return c;
}

inline TrainerOptions quiet() {
  TrainerOptions o;
  o.sample_tokens = 0;
  o.print_progress = false;
  return o;
}

// Grid over MPI_COMM_WORLD with `tp` adjacent ranks per TP group (ProcessGrid's layout).
inline TrainGrid world_grid(int tp) {
  int r = world_rank(), n = world_size();
  MpiComm world(MPI_COMM_WORLD, false);
  auto ms = std::chrono::milliseconds(120000);
  TrainGrid g;
  g.world = std::make_shared<MpiCommunicator>(world, "world", ms);
  g.tp = std::make_shared<MpiCommunicator>(world.split(r / tp, r % tp), "tp", ms);
  g.dp = std::make_shared<MpiCommunicator>(world.split(r % tp, r / tp), "dp", ms);
  (void)n;
  return g;
}

inline double max_over_ranks(double x) {
  double out = 0;
  MPI_Allreduce(&x, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

// Largest |a - b| over the per-step losses; prints it.
inline double loss_diff(const std::string& what, const TrainResult& a, const TrainResult& b) {
  EXPECT_EQ(a.steps.size(), b.steps.size()) << what;
  double d = 0;
  for (size_t i = 0; i < std::min(a.steps.size(), b.steps.size()); ++i)
    d = std::max(d, std::abs(a.steps[i].loss - b.steps[i].loss));
  d = max_over_ranks(d);
  if (world_rank() == 0) {
    std::printf("  %-50s losses:", what.c_str());
    for (const auto& s : a.steps) std::printf(" %.6f", s.loss);
    std::printf("\n  %-50s max |loss diff| = %.3e\n", "", d);
  }
  return d;
}

// Largest relative difference over every weight (full, gathered over TP) of two models.
inline double weight_diff(const std::string& what, LlamaForCausalLM& a, LlamaForCausalLM& b) {
  StateDict fa = a->full_state_dict(), fb = b->full_state_dict();
  double worst = 0;
  for (const auto& [name, t] : fa) worst = std::max(worst, test::rel_err(t, fb.at(name)));
  worst = max_over_ranks(worst);
  if (world_rank() == 0) std::printf("  %-50s max rel weight diff = %.3e\n", what.c_str(), worst);
  return worst;
}

}  // namespace andy::train_test
