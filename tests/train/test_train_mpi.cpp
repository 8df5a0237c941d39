// Trainer tests on real ranks (ctest runs them under mpirun -np 2 and -np 4), fp32 CPU:
// DP=2 vs DP=1 at the same global batch, accumulation 4 x 2 vs 1 x 8, TP x DP vs TP=1 x DP=1
// (losses, weights, and the clipping norm against the dense norm of the TP=1 run), resume
// reproducing the uninterrupted losses exactly, a truncated checkpoint or one of another shape
// refused, a failed save leaving the previous checkpoint complete and latest, the loss
// scaler's agreement on an injected inf, its growth and its state across resume, and bf16.
// Every rank also runs the single-rank references (TrainGrid::single()) in its own directory.
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>

#include <dlfcn.h>

#include <nlohmann/json.hpp>

#include "launch/checkpoint.h"
#include "launch/cli.h"
#include "tests/train/train_test_util.h"

using namespace andy;
using namespace andy::train_test;
namespace fs = std::filesystem;

namespace {

// Weights: different summation orders (ranks, accumulation) differ at roundoff level; AdamW
// (eps 1e-5 in these runs, train_test_util.h) keeps that from growing past ~1e-5 in 5 steps.
constexpr double kWeightTol = 5e-5;

std::string per_rank(const std::string& tag) { return tag + "_r" + std::to_string(world_rank()); }

// A 4-step TP=1 x DP=world run (global batch 8) and the same run stopped after step 2, which
// leaves its checkpoint step_00000002 in part.train.output_dir.
struct InterruptedRun {
  std::unique_ptr<Trainer> full;
  TrainResult full_result;
  Config part;
};

InterruptedRun run_full_and_stop_at_2(const std::string& tag) {
  InterruptedRun r;
  Config base = tiny_run(tag + "_full", 4);
  base.train.batch_size = 8 / world_size();
  r.full = std::make_unique<Trainer>(base, world_grid(1), quiet());
  r.full_result = r.full->run();
  r.part = base;
  r.part.train.output_dir = dataset().root + "/runs/" + tag + "_part";
  TrainerOptions stop = quiet();
  stop.stop_after_steps = 2;
  Trainer t(r.part, world_grid(1), stop);
  t.run();
  return r;
}

// Largest |loss| difference over all ranks between a resumed run's steps and the same steps of
// the uninterrupted run.
double resumed_loss_diff(const TrainResult& resumed, const TrainResult& full) {
  double d = 0;
  for (size_t i = 0; i < resumed.steps.size(); ++i) {
    d = std::max(d, std::abs(resumed.steps[i].loss - full.steps[resumed.start_step + i].loss));
  }
  return max_over_ranks(d);
}

TEST(Trainer, DataParallelMatchesSingleRankAtSameGlobalBatch) {
  const int n = world_size();
  Config par = tiny_run("dp" + std::to_string(n));
  par.train.batch_size = 8 / n;
  Trainer a(par, world_grid(1), quiet());
  TrainResult ra = a.run();

  Config ref = tiny_run(per_rank("dp1_ref"));
  Trainer b(ref, TrainGrid::single(), quiet());
  TrainResult rb = b.run();

  EXPECT_LT(loss_diff("DP=" + std::to_string(n) + " x batch " + std::to_string(8 / n) + " vs DP=1 x 8", ra, rb), 1e-5);
  EXPECT_LT(weight_diff("weights after 5 steps", a.model(), b.model()), kWeightTol);
  ASSERT_EQ(ra.steps.size(), 5u);
}

TEST(Trainer, AccumulationMatchesLargerMicroBatch) {
  Config acc = tiny_run(per_rank("acc4x2"));
  acc.train.batch_size = 2;
  acc.train.gradient_accumulation_steps = 4;
  Trainer a(acc, TrainGrid::single(), quiet());
  TrainResult ra = a.run();
  Config big = tiny_run(per_rank("acc1x8"));
  Trainer b(big, TrainGrid::single(), quiet());
  TrainResult rb = b.run();
  EXPECT_LT(loss_diff("accumulation 4 x 2 vs 1 x 8", ra, rb), 1e-5);
  EXPECT_LT(weight_diff("weights after 5 steps", a.model(), b.model()), kWeightTol);
}

TEST(Trainer, DataParallelAccumulationNeedsNoCommunicationOnNonFinalSteps) {
  // DP over the world with accumulation 2: equals the single-rank run at the same global batch.
  const int n = world_size();
  if (8 % (2 * n) != 0) GTEST_SKIP() << "needs 8 divisible by 2 x world";
  Config par = tiny_run("dpacc" + std::to_string(n));
  par.train.batch_size = 8 / (2 * n);
  par.train.gradient_accumulation_steps = 2;
  Trainer a(par, world_grid(1), quiet());
  TrainResult ra = a.run();
  Config ref = tiny_run(per_rank("dpacc_ref"));
  Trainer b(ref, TrainGrid::single(), quiet());
  TrainResult rb = b.run();
  EXPECT_LT(loss_diff("DP x accumulation 2 vs DP=1 x 8", ra, rb), 1e-5);
  EXPECT_LT(weight_diff("weights after 5 steps", a.model(), b.model()), kWeightTol);
}

// TP = 2 (x DP = world / 2) against TP = 1 x DP = 1: losses, weights and the global grad norm
// (before clipping) against the dense norm of the TP=1 run, step by step. With the gradients
// all-reduced (DistributedOptimizer.TensorTimesDataParallelMatchesSingleRank: sharded).
TEST(Trainer, TensorTimesDataParallelMatchesSingleRank) {
  const int n = world_size();
  Config par = tiny_run("tp2dp" + std::to_string(n / 2));
  par.parallel.tensor_parallel_size = 2;
  par.parallel.distributed_optimizer = false;
  par.train.batch_size = 8 / (n / 2);
  par.train.grad_clip = 0.5;  // clipping active: a wrong norm changes the weights
  Trainer a(par, world_grid(2), quiet());
  TrainResult ra = a.run();
  Config ref = tiny_run(per_rank("tp1_ref"));
  ref.train.grad_clip = 0.5;
  Trainer b(ref, TrainGrid::single(), quiet());
  TrainResult rb = b.run();
  EXPECT_LT(loss_diff("TP=2 x DP=" + std::to_string(n / 2) + " vs TP=1 x DP=1", ra, rb), 1e-5);
  EXPECT_LT(weight_diff("weights after 5 steps", a.model(), b.model()), kWeightTol);
  double worst = 0;
  for (size_t i = 0; i < ra.steps.size() && i < rb.steps.size(); ++i)
    worst = std::max(worst, std::abs(ra.steps[i].grad_norm - rb.steps[i].grad_norm) / rb.steps[i].grad_norm);
  worst = max_over_ranks(worst);
  if (world_rank() == 0)
    std::printf("  grad norm step 1: TP=2 %.6f, dense TP=1 %.6f; max rel diff over steps %.3e\n",
                ra.steps[0].grad_norm, rb.steps[0].grad_norm, worst);
  EXPECT_LT(worst, 1e-5);
  EXPECT_GT(rb.steps[0].grad_norm, 0.5) << "the test wants clipping to be active";
  // Copies stay bitwise identical: every parameter across its DP replicas, and the parameters
  // TP does not split (norm weights) across the TP group as well.
  MPI_Comm tp_comm, dp_comm;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() / 2, world_rank() % 2, &tp_comm);
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() % 2, world_rank() / 2, &dp_comm);
  int differing = 0, replicated = 0;
  for (const auto& p : a.params()) {
    at::Tensor mine = p.param.detach().contiguous().clone();
    at::Tensor first = mine.clone();
    MPI_Bcast(first.data_ptr(), static_cast<int>(first.numel()), MPI_FLOAT, 0, dp_comm);
    if (!mine.equal(first)) ++differing;
    if (!p.tp_sharded()) {
      ++replicated;
      first = mine.clone();
      MPI_Bcast(first.data_ptr(), static_cast<int>(first.numel()), MPI_FLOAT, 0, tp_comm);
      if (!mine.equal(first)) ++differing;
    }
  }
  MPI_Comm_free(&tp_comm);
  MPI_Comm_free(&dp_comm);
  EXPECT_GT(replicated, 0);
  EXPECT_EQ(max_over_ranks(differing), 0) << "replicated parameters drifted apart";
}

// Clipping norm, checked by hand: concatenate the TP=1 model's dense gradients.
TEST(Trainer, GlobalNormEqualsDenseNormOfTp1) {
  Config c = tiny_run("norm");
  c.parallel.tensor_parallel_size = 2;
  TrainGrid g = world_grid(2);
  LlamaForCausalLM par(c.model, g.tp, c.train.seed), ref(c.model, nullptr, c.train.seed);
  at::Tensor tokens = test::random_tokens(2, 16, 100, 7), targets = test::random_tokens(2, 16, 100, 8);
  par->loss(par->forward(tokens), targets).backward();
  ref->loss(ref->forward(tokens), targets).backward();
  std::vector<at::Tensor> grads;
  for (auto& p : ref->parameters()) grads.push_back(p.grad().reshape({-1}));
  double dense = at::cat(grads).to(at::kDouble).norm().item<double>();
  double global = global_grad_norm(par->param_infos(), g.tp.get());
  double rel = max_over_ranks(std::abs(global - dense) / dense);
  if (world_rank() == 0) std::printf("  global norm %.8f vs dense %.8f: rel %.3e\n", global, dense, rel);
  EXPECT_LT(rel, 1e-6);
}

TEST(Trainer, ResumeReproducesUninterruptedLosses) {
  const int n = world_size();
  Config base = tiny_run("resume_full", 6);
  base.train.batch_size = 8 / n;
  base.checkpoint.interval = 2;
  Trainer full(base, world_grid(1), quiet());
  TrainResult rf = full.run();

  Config part = base;
  part.train.output_dir = dataset().root + "/runs/resume_part";
  TrainerOptions stop = quiet();
  stop.stop_after_steps = 3;  // as if SIGTERM arrived after step 3
  TrainResult r1;
  {
    Trainer t(part, world_grid(1), stop);
    r1 = t.run();
  }
  ASSERT_TRUE(r1.stopped_by_signal);
  ASSERT_EQ(r1.final_step, 3);
  EXPECT_TRUE(fs::exists(part.train.output_dir + "/checkpoints/step_00000003/meta.json"));
  part.checkpoint.resume = "auto";
  Trainer t2(part, world_grid(1), quiet());
  TrainResult r2 = t2.run();
  ASSERT_EQ(r2.start_step, 3);
  TrainResult joined = r1;
  joined.steps.insert(joined.steps.end(), r2.steps.begin(), r2.steps.end());
  double d = loss_diff("stop at 3 + resume vs uninterrupted", joined, rf);
  EXPECT_EQ(d, 0.0) << "resume must reproduce the losses exactly";
  EXPECT_EQ(weight_diff("weights at step 6", t2.model(), full.model()), 0.0);
  // keep_last = 3 by default: steps 2, 4 (interval) and 6 (end) of the full run.
  if (world_rank() == 0) {
    EXPECT_TRUE(fs::exists(base.train.output_dir + "/checkpoints/step_00000006"));
    EXPECT_EQ(data::testing::read_text(base.train.output_dir + "/checkpoints/latest"), "step_00000006\n");
  }
}

TEST(Trainer, ResumeWithOtherTpSizeReshards) {
  const int n = world_size();
  InterruptedRun run = run_full_and_stop_at_2("reshard");
  Config part = run.part;
  // Resume the TP=1 x DP=n checkpoint as TP=2 x DP=n/2 (same global batch).
  part.parallel.tensor_parallel_size = 2;
  part.train.batch_size = 8 / (n / 2);
  part.checkpoint.resume = "auto";
  Trainer t2(part, world_grid(2), quiet());
  TrainResult r2 = t2.run();
  ASSERT_EQ(r2.start_step, 2);
  double d = resumed_loss_diff(r2, run.full_result);
  if (world_rank() == 0) std::printf("  resharded TP=1 -> TP=2 resume: max |loss diff| steps 3-4 = %.3e\n", d);
  EXPECT_LT(d, 1e-5);
  EXPECT_LT(weight_diff("weights at step 4", t2.model(), run.full->model()), kWeightTol);
}

// A checkpoint of DP = world resumed by one rank (DP = 1, same global batch of 8): the cursor
// is kept in windows, so the continuation sees the same data and matches the full run.
TEST(Trainer, ResumeWithOtherDpSize) {
  const int n = world_size();
  InterruptedRun run = run_full_and_stop_at_2("dpresize");
  const Config& part = run.part;
  Config single = part;
  single.train.batch_size = 8;
  single.checkpoint.resume = part.train.output_dir + "/checkpoints/step_00000002";
  single.train.output_dir = dataset().root + "/runs/" + per_rank("dpresize_single");
  TrainerOptions o = quiet();
  o.write_checkpoints = false;  // every rank resumes alone from the same directory
  Trainer t2(single, TrainGrid::single(), o);
  TrainResult r2 = t2.run();
  ASSERT_EQ(r2.start_step, 2);
  double d = resumed_loss_diff(r2, run.full_result);
  if (world_rank() == 0) std::printf("  DP=%d checkpoint resumed with DP=1: max |loss diff| steps 3-4 = %.3e\n", n, d);
  EXPECT_LT(d, 1e-5);
  EXPECT_LT(weight_diff("weights at step 4", t2.model(), run.full->model()), kWeightTol);
}

// parallel.distributed_optimizer (ZeRO-1): each DP rank keeps the AdamW moments of 1/dp of the
// parameters, receives its shard of the averaged gradients (reduce-scatter) and all-gathers the
// updated parameters. Without clipping (whose norm it sums in another order) it is the same
// computation as the all-reduce run: at DP = 2 (a sum of two, the same in any order) losses and
// weights equal bit for bit; at DP = 4 to roundoff (the all-reduce of a bucket under 4 MB is
// Open MPI's, which orders the sum otherwise); and the DP=1 run to roundoff.
TEST(DistributedOptimizer, MatchesAllReduceBitForBitAndSingleRank) {
  const int n = world_size();
  Config base = tiny_run("zero_off" + std::to_string(n));
  base.train.batch_size = 8 / n;
  base.train.grad_clip = 0;
  base.parallel.distributed_optimizer = false;
  Trainer a(base, world_grid(1), quiet());
  TrainResult ra = a.run();
  Config zero = base;
  zero.train.output_dir = dataset().root + "/runs/zero_on" + std::to_string(n);
  zero.parallel.distributed_optimizer = true;
  Trainer b(zero, world_grid(1), quiet());
  TrainResult rb = b.run();
  ASSERT_TRUE(b.optimizer().sharded());
  const double exact = n == 2 ? 0.0 : 1e-5;
  EXPECT_LE(loss_diff("DP=" + std::to_string(n) + " distributed optimizer vs all-reduce", rb, ra), exact);
  EXPECT_LE(weight_diff("weights after 5 steps", b.model(), a.model()), n == 2 ? 0.0 : kWeightTol);
  // Each rank keeps about 1/n of the moments (buckets are padded to a multiple of n).
  const int64_t full = a.optimizer().state_bytes(), mine = b.optimizer().state_bytes();
  if (world_rank() == 0)
    std::printf("  AdamW moments per rank: %lld bytes (all-reduce run %lld)\n", static_cast<long long>(mine),
                static_cast<long long>(full));
  EXPECT_LE(mine, full / n + 64 * n * static_cast<int64_t>(sizeof(float)) * b.grad_reducer().num_buckets());
  Config ref = tiny_run(per_rank("zero_ref"));
  ref.train.grad_clip = 0;
  Trainer c(ref, TrainGrid::single(), quiet());
  TrainResult rc = c.run();
  EXPECT_LT(loss_diff("distributed optimizer vs DP=1 x 8", rb, rc), 1e-5);
  EXPECT_LT(weight_diff("weights after 5 steps", b.model(), c.model()), kWeightTol);
}

// TP = 2 x DP = world / 2 with the distributed optimizer and active clipping (its norm summed
// over the DP shards, then TP) against TP = 1 x DP = 1; the DP replicas stay bitwise equal.
TEST(DistributedOptimizer, TensorTimesDataParallelMatchesSingleRank) {
  const int n = world_size();
  if (n < 4) GTEST_SKIP() << "needs DP >= 2 beside TP = 2";
  Config par = tiny_run("zero_tp2dp" + std::to_string(n / 2));
  par.parallel.tensor_parallel_size = 2;
  par.parallel.distributed_optimizer = true;
  par.train.batch_size = 8 / (n / 2);
  par.train.grad_clip = 0.5;
  Trainer a(par, world_grid(2), quiet());
  TrainResult ra = a.run();
  ASSERT_TRUE(a.optimizer().sharded());
  Config ref = tiny_run(per_rank("zero_tp1_ref"));
  ref.train.grad_clip = 0.5;
  Trainer b(ref, TrainGrid::single(), quiet());
  TrainResult rb = b.run();
  EXPECT_LT(loss_diff("TP=2 x DP=" + std::to_string(n / 2) + " distributed optimizer vs TP=1", ra, rb), 1e-5);
  EXPECT_LT(weight_diff("weights after 5 steps", a.model(), b.model()), kWeightTol);
  double worst = 0;
  for (size_t i = 0; i < ra.steps.size() && i < rb.steps.size(); ++i)
    worst = std::max(worst, std::abs(ra.steps[i].grad_norm - rb.steps[i].grad_norm) / rb.steps[i].grad_norm);
  worst = max_over_ranks(worst);
  EXPECT_LT(worst, 1e-5) << "clipping norm";
  MPI_Comm dp_comm;
  MPI_Comm_split(MPI_COMM_WORLD, world_rank() % 2, world_rank() / 2, &dp_comm);
  int differing = 0;
  for (const auto& p : a.params()) {
    at::Tensor mine = p.param.detach().contiguous().clone(), first = mine.clone();
    MPI_Bcast(first.data_ptr(), static_cast<int>(first.numel()), MPI_FLOAT, 0, dp_comm);
    if (!mine.equal(first)) ++differing;
  }
  MPI_Comm_free(&dp_comm);
  EXPECT_EQ(max_over_ranks(differing), 0) << "DP replicas drifted apart";
}

// Checkpoints keep one format: the distributed optimizer's moments are gathered into the same
// files (at DP = 2 byte for byte those of the all-reduce run); a sharded run stopped and resumed
// (sharded, or not) reproduces the uninterrupted run, and an all-reduce checkpoint resumes
// sharded: exactly at DP = 2, to roundoff at DP = 4 (see above).
TEST(DistributedOptimizer, CheckpointsAreTheSameFilesAndResumeExactly) {
  const int n = world_size();
  Config base = tiny_run("zero_ckpt_full", 4);
  base.train.batch_size = 8 / n;
  base.train.grad_clip = 0;
  base.parallel.distributed_optimizer = false;
  base.checkpoint.interval = 2;
  Trainer full(base, world_grid(1), quiet());
  TrainResult rf = full.run();

  Config part = base;
  part.train.output_dir = dataset().root + "/runs/zero_ckpt_part";
  part.parallel.distributed_optimizer = true;
  TrainerOptions stop = quiet();
  stop.stop_after_steps = 2;
  TrainResult r1;
  {
    Trainer t(part, world_grid(1), stop);
    r1 = t.run();
  }
  ASSERT_EQ(r1.final_step, 2);
  const std::string step2 = "/checkpoints/step_00000002/";
  const double tol = n == 2 ? 0.0 : 1e-5, wtol = n == 2 ? 0.0 : kWeightTol;
  if (world_rank() == 0 && n == 2) {
    EXPECT_TRUE(data::testing::read_text(part.train.output_dir + step2 + "shard_tp00.pt") ==
                data::testing::read_text(base.train.output_dir + step2 + "shard_tp00.pt"))
        << "the sharded run's optimizer file differs from the all-reduce run's";
    EXPECT_TRUE(data::testing::read_text(part.train.output_dir + step2 + "model_tp00.safetensors") ==
                data::testing::read_text(base.train.output_dir + step2 + "model_tp00.safetensors"));
  }
  for (const bool resume_sharded : {true, false}) {
    Config cont = part;
    cont.parallel.distributed_optimizer = resume_sharded;
    cont.checkpoint.resume = part.train.output_dir + step2;
    cont.train.output_dir = dataset().root + "/runs/zero_ckpt_cont" + std::to_string(resume_sharded);
    Trainer t2(cont, world_grid(1), quiet());
    TrainResult r2 = t2.run();
    ASSERT_EQ(r2.start_step, 2);
    EXPECT_LE(resumed_loss_diff(r2, rf), tol) << "resumed " << (resume_sharded ? "sharded" : "with all-reduce");
    EXPECT_LE(weight_diff("weights at step 4", t2.model(), full.model()), wtol);
  }
  // The all-reduce run's checkpoint, resumed with the distributed optimizer.
  Config cont = base;
  cont.parallel.distributed_optimizer = true;
  cont.checkpoint.resume = base.train.output_dir + step2;
  cont.train.output_dir = dataset().root + "/runs/zero_ckpt_from_ar";
  Trainer t3(cont, world_grid(1), quiet());
  TrainResult r3 = t3.run();
  ASSERT_EQ(r3.start_step, 2);
  EXPECT_LE(resumed_loss_diff(r3, rf), tol);
  EXPECT_LE(weight_diff("weights at step 4", t3.model(), full.model()), wtol);
}

// An inf injected into one rank's gradient shard: every rank skips the step, the replicas stay
// equal.
TEST(DistributedOptimizer, InjectedInfIsSkippedEverywhere) {
  const int n = world_size();
  Config c = tiny_run("zero_scaler", 3);
  c.train.batch_size = 8 / n;
  c.parallel.distributed_optimizer = true;
  c.precision.loss_scale_init = 1024;
  TrainerOptions o = quiet();
  o.force_loss_scaler = true;
  o.inject_inf_rank = n - 1;
  o.inject_inf_step = 2;
  Trainer t(c, world_grid(1), o);
  TrainResult r = t.run();
  ASSERT_EQ(r.steps.size(), 3u);
  EXPECT_FALSE(r.steps[0].skipped);
  EXPECT_TRUE(r.steps[1].skipped);
  EXPECT_FALSE(r.steps[2].skipped);
  EXPECT_EQ(r.steps[2].loss_scale, 512);
  int differing = 0;
  for (const auto& p : t.params()) {
    at::Tensor mine = p.param.detach().contiguous().clone(), first = mine.clone();
    MPI_Bcast(first.data_ptr(), static_cast<int>(first.numel()), MPI_FLOAT, 0, MPI_COMM_WORLD);
    if (!mine.equal(first)) ++differing;
  }
  EXPECT_EQ(max_over_ranks(differing), 0);
}

TEST(Trainer, TruncatedOrPartialCheckpointIsRefusedNamingTheFile) {
  Config c = tiny_run("damaged", 2);
  c.train.batch_size = 8 / world_size();
  { Trainer t(c, world_grid(1), quiet()); t.run(); }
  std::string dir = c.train.output_dir + "/checkpoints/step_00000002";
  std::string shard = dir + "/shard_tp00.pt";
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) {
    auto size = fs::file_size(shard);
    fs::resize_file(shard, size / 2);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  c.checkpoint.resume = "auto";
  // At setup (the Trainer's constructor): the recorded checksum no longer matches.
  try {
    Trainer refused(c, world_grid(1), quiet());
    ADD_FAILURE() << "setup accepted a truncated checkpoint";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(shard + " is damaged: checksum"), std::string::npos) << e.what();
  }
  // And load_checkpoint itself (a trainer of another output_dir) refuses it too.
  Config other = c;
  other.train.output_dir += "_t2";
  other.checkpoint.resume = "none";
  Trainer t2(other, world_grid(1), quiet());
  try {
    load_checkpoint(t2, dir);
    ADD_FAILURE() << "a truncated checkpoint was accepted";
  } catch (const IoError& e) {
    std::string msg = e.what();
    if (world_rank() == 0) std::printf("  refused: %s\n", msg.c_str());
    EXPECT_NE(msg.find("shard_tp00.pt"), std::string::npos) << msg;
  }
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) fs::remove(shard);
  MPI_Barrier(MPI_COMM_WORLD);
  try {
    load_checkpoint(t2, dir);
    ADD_FAILURE() << "a checkpoint without its shard was accepted";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("shard_tp00.pt"), std::string::npos) << e.what();
  }
}

// A checkpoint of another model shape is refused: by its saved config (the differing [model]
// keys named), and without one (older format) by the first tensor of the wrong shape.
TEST(Trainer, CheckpointOfAnotherShapeIsRefused) {
  Config c = tiny_run("othershape", 2);
  c.train.batch_size = 8 / world_size();
  { Trainer t(c, world_grid(1), quiet()); t.run(); }
  const std::string dir = c.train.output_dir + "/checkpoints/step_00000002";
  Config other = c;
  other.model.ffn_dim = 96;  // the MLP of the saved model is wider
  other.train.output_dir += "_other";  // a fresh run over the first one's would be refused
  Trainer t2(other, world_grid(1), quiet());
  auto refusal = [&] {
    try {
      load_checkpoint(t2, dir);
    } catch (const IoError& e) {
      return std::string(e.what());
    }
    return std::string("(accepted)");
  };
  std::string msg = refusal();
  if (world_rank() == 0) std::printf("  refused: %s\n", msg.c_str());
  EXPECT_NE(msg.find(dir + " holds another model: [model] ffn_dim (derived) = 192 there, 96 here"),
            std::string::npos) << msg;
  MPI_Barrier(MPI_COMM_WORLD);
  if (world_rank() == 0) {  // drop the saved config, as in a checkpoint without one
    auto meta = nlohmann::json::parse(data::testing::read_text(dir + "/meta.json"));
    meta.erase("config");
    data::testing::write_file(dir + "/meta.json", meta.dump(2));
  }
  MPI_Barrier(MPI_COMM_WORLD);
  msg = refusal();
  if (world_rank() == 0) std::printf("  refused: %s\n", msg.c_str());
  EXPECT_NE(msg.find("model_tp00.safetensors"), std::string::npos) << msg << " (the weights' file)";
  EXPECT_NE(msg.find("has shape"), std::string::npos) << msg;
}

// One rank fails to write its part of the final checkpoint (as on a full disk): every rank
// reports it, nothing of the failed save remains, the previous checkpoint is still `latest`
// and complete, and the run resumes from it.
TEST(Trainer, FailedSaveKeepsThePreviousCheckpoint) {
  Config c = tiny_run("failsave", 4);
  c.train.batch_size = 8 / world_size();
  c.checkpoint.interval = 2;
  TrainerOptions o = quiet();
  o.fail_checkpoint_rank = world_size() - 1;
  o.fail_checkpoint_step = 4;
  std::string msg;
  try {
    Trainer t(c, world_grid(1), o);
    t.run();
    ADD_FAILURE() << "the failed save was not reported";
  } catch (const IoError& e) {
    msg = e.what();
    const auto* agreed = dynamic_cast<const AgreedFailure*>(&e);
    ASSERT_NE(agreed, nullptr) << "a failed save must be an agreed error (no MPI_Abort)";
    EXPECT_EQ(agreed->report(), world_rank() == world_size() - 1);
    EXPECT_EQ(agreed->exit_code(), 1);
  }
  // Every rank throws the failing rank's message; only that rank reports it (printed once).
  EXPECT_NE(msg.find("step_00000004.tmp/shard_tp00.pt: injected failure"), std::string::npos) << msg;
  MPI_Barrier(MPI_COMM_WORLD);
  const std::string root = c.train.output_dir + "/checkpoints";
  EXPECT_EQ(data::testing::read_text(root + "/latest"), "step_00000002\n");
  EXPECT_TRUE(fs::exists(root + "/step_00000002/meta.json"));
  EXPECT_TRUE(fs::exists(root + "/step_00000002/shard_tp00.pt"));
  EXPECT_FALSE(fs::exists(root + "/step_00000004"));
  EXPECT_FALSE(fs::exists(root + "/step_00000004.tmp"));
  MPI_Barrier(MPI_COMM_WORLD);
  c.checkpoint.resume = "auto";
  Trainer t2(c, world_grid(1), quiet());
  TrainResult r = t2.run();
  EXPECT_EQ(r.start_step, 2);
  EXPECT_EQ(r.final_step, 4);
  EXPECT_EQ(data::testing::read_text(root + "/latest"), "step_00000004\n");
}

// A stop right after a periodic save writes the same step again: the complete checkpoint is
// replaced only once the new one is in place.
TEST(Trainer, SavingTheSameStepTwiceKeepsOneCompleteCheckpoint) {
  Config c = tiny_run("samestep", 2);
  c.train.batch_size = 8 / world_size();
  Trainer t(c, world_grid(1), quiet());
  t.run();
  const std::string root = c.train.output_dir + "/checkpoints";
  EXPECT_EQ(save_checkpoint(t), root + "/step_00000002");
  MPI_Barrier(MPI_COMM_WORLD);
  EXPECT_TRUE(fs::exists(root + "/step_00000002/meta.json"));
  EXPECT_FALSE(fs::exists(root + "/step_00000002.old"));
  EXPECT_EQ(data::testing::read_text(root + "/latest"), "step_00000002\n");
}

TEST(LossScaler, InfOnOneRankMakesEveryRankSkipAndBackOff) {
  PrecisionConfig p;
  p.loss_scale_init = 1024;
  p.loss_scale_growth_interval = 2;
  LossScaler s(p, true);
  auto world = world_grid(1).world;
  bool skip = s.update(world_rank() == world_size() - 1, world.get());
  EXPECT_TRUE(skip);
  EXPECT_EQ(s.scale(), 512);
  EXPECT_FALSE(s.update(false, world.get()));
  EXPECT_EQ(s.scale(), 512);
  EXPECT_FALSE(s.update(false, world.get()));
  EXPECT_EQ(s.scale(), 1024) << "grows after growth_interval good steps";
}

TEST(LossScaler, TrainerSkipsInjectedInfEverywhereAndStateSurvivesResume) {
  const int n = world_size();
  Config c = tiny_run("scaler", 5);
  c.train.batch_size = 8 / n;
  c.precision.loss_scale_init = 1024;
  c.precision.loss_scale_growth_interval = 2;
  TrainerOptions o = quiet();
  o.force_loss_scaler = true;
  o.inject_inf_rank = n - 1;
  o.inject_inf_step = 2;
  o.stop_after_steps = 4;
  TrainResult r;
  double scale_at_stop = 0;
  {
    Trainer t(c, world_grid(1), o);
    r = t.run();
    scale_at_stop = t.scaler().scale();
  }
  ASSERT_EQ(r.steps.size(), 4u);
  // step 1 good, 2 skipped (back off 1024 -> 512), 3 and 4 good (grow to 1024 after 2).
  int skipped_here = 0;
  for (const auto& s : r.steps) skipped_here += s.skipped;
  int skipped_min = 0;
  MPI_Allreduce(&skipped_here, &skipped_min, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_EQ(skipped_min, 1) << "every rank must skip the injected step";
  EXPECT_TRUE(r.steps[1].skipped);
  EXPECT_EQ(r.steps[1].loss_scale, 1024);
  EXPECT_EQ(r.steps[2].loss_scale, 512);
  EXPECT_EQ(r.steps[3].loss_scale, 512);
  EXPECT_EQ(scale_at_stop, 1024);
  if (world_rank() == 0)
    std::printf("  loss scale per step: %g %g %g %g -> %g\n", r.steps[0].loss_scale, r.steps[1].loss_scale,
                r.steps[2].loss_scale, r.steps[3].loss_scale, scale_at_stop);
  // Resume: the scale (and growth tracker) come back from the checkpoint.
  c.checkpoint.resume = "auto";
  TrainerOptions o2 = quiet();
  o2.force_loss_scaler = true;
  Trainer t2(c, world_grid(1), o2);
  load_checkpoint(t2, resolve_resume_path(c));
  EXPECT_EQ(t2.scaler().scale(), 1024);
  EXPECT_EQ(t2.step(), 4);
  // Replicas stayed identical across DP ranks through the skipped step.
  at::Tensor w = t2.model()->local_state_dict().at("model.layers.0.mlp.up_proj.weight").clone();
  at::Tensor w0 = w.clone();
  MPI_Bcast(w0.data_ptr(), static_cast<int>(w0.numel()), MPI_FLOAT, 0, MPI_COMM_WORLD);
  EXPECT_TRUE(w.equal(w0));
}

// Issue: NaN was not fatal. In fp32 (no loss scaling) a non-finite gradient on one rank stops
// the run on every rank with one agreed message, before the optimizer step: the last
// checkpoint holds finite weights. fp16 stops after train.max_skipped_steps skips in a row.
TEST(Trainer, NonFiniteGradientsStopTheRunBeforeAnythingIsSaved) {
  const int n = world_size();
  Config c = tiny_run("diverge", 6);
  c.train.batch_size = 8 / n;
  c.checkpoint.interval = 1;
  TrainerOptions o = quiet();
  o.inject_inf_rank = n - 1;
  o.inject_inf_step = 3;
  std::string msg;
  bool reported = false;
  {
    Trainer t(c, world_grid(1), o);
    try {
      t.run();
    } catch (const AgreedFailure& e) {
      msg = e.message();
      reported = e.report();
    }
  }
  EXPECT_NE(msg.find("training diverged at step 3: a gradient is not finite (fp32 has no loss scaling"),
            std::string::npos) << msg;
  int reports = reported, total = 0;
  MPI_Allreduce(&reports, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(total, 1) << "exactly one rank reports";
  c.checkpoint.resume = "auto";
  Trainer t2(c, world_grid(1), quiet());
  const std::string latest = resolve_resume_path(c);
  EXPECT_NE(latest.find("step_00000002"), std::string::npos) << latest;
  load_checkpoint(t2, latest);
  for (const auto& [name, p] : t2.model()->local_state_dict())
    EXPECT_TRUE(p.isfinite().all().item<bool>()) << name;

  // fp16 semantics (the loss scaler) with every step overflowing: stops after 2 skips.
  Config f = tiny_run("diverge16", 6);
  f.train.batch_size = 8 / n;
  f.train.max_skipped_steps = 2;
  TrainerOptions o16 = quiet();
  o16.force_loss_scaler = true;
  o16.inject_inf_rank = 0;
  o16.inject_inf_step = -2;  // every step
  msg.clear();
  try {
    Trainer t3(f, world_grid(1), o16);
    t3.run();
  } catch (const AgreedFailure& e) {
    msg = e.message();
  }
  EXPECT_NE(msg.find("3 consecutive steps overflowed in fp16 (more than train.max_skipped_steps = 2)"),
            std::string::npos) << msg;
}

// LibTorch's threads and OpenBLAS's own pool both follow train.intra_op_threads.
TEST(Threads, ConfigureThreadsSetsLibTorchAndOpenBlas) {
  using GetThreads = int (*)();
  using SetThreads = void (*)(int);
  auto get_blas = reinterpret_cast<GetThreads>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
  auto set_blas = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (!get_blas || !set_blas) GTEST_SKIP() << "the BLAS LibTorch loaded is not OpenBLAS";
  const int before = at::get_num_threads();
  set_blas(2);
  at::set_num_threads(2);
  Config c;
  c.train.intra_op_threads = 1;
  configure_threads(c, nullptr);
  EXPECT_EQ(at::get_num_threads(), 1);
  EXPECT_EQ(get_blas(), 1);
  at::set_num_threads(before);
  set_blas(before);
}

TEST(Trainer, Bf16LossFalls) {
  Config c = tiny_run(per_rank("bf16"), 20);
  c.precision.mode = "bf16";
  Trainer t(c, TrainGrid::single(), quiet());
  TrainResult r = t.run();
  double first = r.steps.front().loss, last = r.steps.back().loss;
  if (world_rank() == 0) std::printf("  bf16: loss %.4f -> %.4f over 20 steps\n", first, last);
  EXPECT_LT(last, first - 0.5);
}

// bf16 with accumulation: autocast's weight casts are kept for the step's micro-batches (one cast
// per weight per step), so every micro-batch's backward must still reach the fp32 weights through
// them, and casts an evaluation made without gradients must not leak into the next step. 4 x 2
// with an evaluation after every step against 1 x 8 without: the gradient norms (before clipping) agree
// to bf16's rounding step by step (a micro-batch whose gradient stopped at a cached cast, or a
// step after an evaluation, would lose a quarter or all of it), and so do the losses.
TEST(Trainer, Bf16AccumulationKeepsEveryMicroBatchsGradient) {
  Config acc = tiny_run(per_rank("bf16_acc4x2"), 6);
  acc.precision.mode = "bf16";
  acc.train.batch_size = 2;
  acc.train.gradient_accumulation_steps = 4;
  acc.train.eval_interval = 1;
  TrainResult a = Trainer(acc, TrainGrid::single(), quiet()).run();
  Config big = tiny_run(per_rank("bf16_acc1x8"), 6);  // no evaluations in between
  big.precision.mode = "bf16";
  TrainResult b = Trainer(big, TrainGrid::single(), quiet()).run();
  ASSERT_EQ(a.steps.size(), b.steps.size());
  ASSERT_EQ(a.val_losses.size(), 7u) << "an evaluation before the first step and after each";
  double norm = 0, loss = 0;
  for (size_t i = 0; i < a.steps.size(); ++i) {
    norm = std::max(norm, std::abs(a.steps[i].grad_norm - b.steps[i].grad_norm) / b.steps[i].grad_norm);
    loss = std::max(loss, std::abs(a.steps[i].loss - b.steps[i].loss));
  }
  if (world_rank() == 0)
    std::printf("  bf16 4 x 2 vs 1 x 8: grad norm step 1 %.5f / %.5f, largest relative difference %.2e; "
                "largest loss difference %.4f\n", a.steps[0].grad_norm, b.steps[0].grad_norm, norm, loss);
  EXPECT_LT(norm, 0.03);
  EXPECT_LT(loss, 0.02);
}

// precision.fp32_residual = false (the residual stream in bf16): the same run's losses stay within
// bf16's rounding of the fp32-residual run's, step by step, and fall as much.
TEST(Trainer, Bf16ResidualStreamTracksFp32Residual) {
  Config c = tiny_run(per_rank("bf16_res32"), 20);
  c.precision.mode = "bf16";
  TrainResult a = Trainer(c, TrainGrid::single(), quiet()).run();
  Config d = tiny_run(per_rank("bf16_res16"), 20);
  d.precision.mode = "bf16";
  d.precision.fp32_residual = false;
  TrainResult b = Trainer(d, TrainGrid::single(), quiet()).run();
  ASSERT_EQ(a.steps.size(), b.steps.size());
  double worst = 0;
  for (size_t i = 0; i < a.steps.size(); ++i) worst = std::max(worst, std::abs(a.steps[i].loss - b.steps[i].loss));
  if (world_rank() == 0)
    std::printf("  bf16 residual: loss %.4f -> %.4f (fp32 residual %.4f -> %.4f), largest step difference %.4f\n",
                b.steps.front().loss, b.steps.back().loss, a.steps.front().loss, a.steps.back().loss, worst);
  EXPECT_LT(worst, 0.05);
  EXPECT_GT(worst, 0.0) << "the same losses to the last bit: precision.fp32_residual = false did not take effect";
  EXPECT_LT(b.steps.back().loss, b.steps.front().loss - 0.5);
}

}  // namespace
