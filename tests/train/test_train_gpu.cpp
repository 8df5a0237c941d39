// Trainer on a CUDA device (label gpu; every test skips where LibTorch sees no GPU, as on the
// CPU build machine). One rank, so it runs on a machine with a single GPU:
//   - fp32 on the GPU follows the CPU run of the same config step by step;
//   - bf16 and fp16 (dynamic loss scaling) train, with the residual stream in fp32 and in the
//     compute dtype: the loss falls, fp16 ends with a finite scale and few skipped steps;
//   - a checkpoint written on the GPU resumes on the GPU with the same next losses.
// Run: ctest -L gpu --output-on-failure   (docs/PERFORMANCE.md has the GPU benchmark commands)
#include <gtest/gtest.h>

#include "core/base/torch_compat.h"
#include "launch/checkpoint.h"
#include "tests/train/train_test_util.h"

using namespace andy;
using namespace andy::train_test;

namespace {

#define SKIP_WITHOUT_GPU()                                                                   \
  if (!at::hasCUDA())                                                                        \
  GTEST_SKIP() << "no CUDA device visible to this LibTorch ("                                \
               << (compat::torch_has_cuda() ? "CUDA build" : "CPU-only build") << ")"

TrainGrid gpu_grid() {
  TrainGrid g = TrainGrid::single();
  g.cuda_device = 0;
  return g;
}

Config gpu_run(const std::string& tag, int64_t steps, const std::string& mode) {
  Config c = tiny_run(tag, steps);
  c.train.device = "cuda";
  c.precision.mode = mode;
  return c;
}

TEST(TrainGpu, Fp32OnTheGpuFollowsTheCpuRun) {
  SKIP_WITHOUT_GPU();
  Config cpu = tiny_run("gpu_ref_cpu", 5);
  Trainer a(cpu, TrainGrid::single(), quiet());
  TrainResult ra = a.run();
  Trainer b(gpu_run("gpu_fp32", 5, "fp32"), gpu_grid(), quiet());
  EXPECT_TRUE(b.device().is_cuda());
  TrainResult rb = b.run();
  // cuBLAS and the CPU BLAS sum in other orders; TF32 is off (LibTorch's default).
  EXPECT_LT(loss_diff("fp32: CUDA vs CPU", rb, ra), 1e-4);
}

TEST(TrainGpu, Bf16AndFp16Train) {
  SKIP_WITHOUT_GPU();
  // fp32_residual false: the residual stream in the compute dtype.
  for (auto [mode, fp32_residual] : {std::pair<std::string, bool>{"bf16", true}, {"fp16", true}, {"bf16", false}, {"fp16", false}}) {
    const std::string variant = mode + (fp32_residual ? "" : " (residual in " + mode + ")");
    Config cfg = gpu_run("gpu_" + mode + (fp32_residual ? "" : "_r16"), 30, mode);
    cfg.precision.fp32_residual = fp32_residual;
    Trainer t(cfg, gpu_grid(), quiet());
    TrainResult r = t.run();
    int skipped = 0;
    for (const auto& s : r.steps) skipped += s.skipped ? 1 : 0;
    double first = r.steps.front().loss, last = r.steps.back().loss;
    std::printf("  %s on CUDA: loss %.4f -> %.4f over 30 steps, %d skipped, final scale %g\n",
                variant.c_str(), first, last, skipped, t.scaler().scale());
    EXPECT_LT(last, first - 0.5) << variant;
    EXPECT_LE(skipped, 5) << variant;
    if (mode == "fp16") {
      EXPECT_TRUE(t.scaler().enabled());
      EXPECT_GE(t.scaler().scale(), 1.0);
    }
  }
}

TEST(TrainGpu, CheckpointResumesOnTheGpu) {
  SKIP_WITHOUT_GPU();
  Config full = gpu_run("gpu_full", 4, "fp32");
  Trainer a(full, gpu_grid(), quiet());
  TrainResult ra = a.run();
  Config part = gpu_run("gpu_part", 4, "fp32");
  TrainerOptions stop = quiet();
  stop.stop_after_steps = 2;
  { Trainer b(part, gpu_grid(), stop); b.run(); }
  part.checkpoint.resume = "auto";
  Trainer c(part, gpu_grid(), quiet());
  TrainResult rc = c.run();
  ASSERT_EQ(rc.start_step, 2);
  ASSERT_EQ(rc.steps.size(), 2u);
  // Embedding backward on CUDA accumulates with atomics: equal up to summation order.
  for (size_t i = 0; i < 2; ++i) EXPECT_NEAR(rc.steps[i].loss, ra.steps[i + 2].loss, 1e-5) << i;
}

}  // namespace
