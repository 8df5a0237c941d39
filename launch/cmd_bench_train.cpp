// `andyllm bench train`: runs the real Trainer for --steps optimizer steps of a config (no
// validation, checkpoints or sample) and reports, over the steps after --warmup: tokens/s, MFU
// (against train.peak_tflops or the GPU's datasheet peak, and against the matmul rate measured on every rank
// before and after the steps), and
// the share of step time spent waiting for the DP gradient all-reduce.
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "core/base/logging.h"
#include "core/base/torch_compat.h"
#include "core/model/model_stats.h"
#include "launch/commands.h"
#include "launch/trainer.h"
#include "parallel/process_grid.h"

namespace andy {

int bench_train(const ParsedArgs& args, World* world) {
  Config cfg = load_config_collectively(args, world);
  configure_threads(cfg, world);
  const int64_t steps = args.get_int("steps", 20), warmup = args.get_int("warmup", 3);
  ANDY_CHECK_T(ConfigError, steps > warmup && warmup >= 0,
               "andyllm bench train: expected --steps > --warmup >= 0");
  const std::string profile = args.get("profile");
  const int64_t profile_steps = profile.empty() ? 0 : args.get_int("profile_steps", 3);
  ANDY_CHECK_T(ConfigError, profile.empty() || profile_steps >= 1, "andyllm bench train: expected --profile_steps >= 1");
  ANDY_CHECK_T(ConfigError, profile.empty() || compat::kHasKinetoProfiler,
               "andyllm bench train --profile: this LibTorch (", TORCH_VERSION,
               ") has no trace profiler the C++ API can drive (2.1+ needed); on CPU use scripts/profile_train.sh (perf)");
  cfg.train.max_steps = steps + profile_steps;
  cfg.data.val_file = "";
  cfg.checkpoint.resume = "none";
  cfg.train.log_interval = steps + 1;
  const GridOptions g = grid_options_from(cfg, cfg.train.device, "[train] device",
                                          static_cast<int>(cfg.parallel.tensor_parallel_size), world);
  ProcessGrid grid(*world, g);
  // Measured matmul rate (CPU): every rank at once (as they run during training), summed.
  const at::ScalarType matmul_dtype = cpu_matmul_dtype(cfg.precision.mode);
  at::Device dev = g.device >= 0 ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(g.device)) : at::Device(at::kCPU);
  auto measured_rate = [&] {
    at::Tensor rate =
        at::full({1}, cfg.train.device == "cpu" ? measure_matmul_flops(matmul_dtype) : 0.0, at::kDouble);
    all_reduce_host(&grid.world(), rate, ReduceOp::kSum, dev);
    return rate.item<double>();
  };
  const double rate_before = measured_rate();

  TrainerOptions o;
  o.sample_tokens = 0;
  o.print_progress = false;
  o.write_checkpoints = false;
  // The traced steps come after the timed ones (the profiler slows what it watches).
  const std::string trace_path =
      profile + (world->size() > 1 ? ".rank" + std::to_string(world->rank()) : std::string());
  bool tracing = false;
  if (profile_steps > 0)
    o.before_step = [&](int64_t done) {
      if (done != steps) return;
      if (dev.is_cuda()) compat::cuda_synchronize(dev.index());
      compat::profiler_start(dev.is_cuda());
      tracing = true;
    };
  Trainer trainer(cfg, TrainGrid::from(grid, g.device), o);
  TrainResult r = trainer.run();
  if (tracing) {
    if (dev.is_cuda()) compat::cuda_synchronize(dev.index());
    compat::profiler_stop(trace_path);
    log::info("profile of ", profile_steps, " step(s) after the timed ones written to ", trace_path);
  }
  // The matmul rate again after the steps: a VM's speed drifts with its neighbours' load (the
  // 25 M fp32 step and the rate measured before it each moved by up to 10 % from run to run on
  // the 2-core VMs), so MFU is quoted against the mean of the rates before and after the steps.
  const double rate_after = measured_rate();
  const double rate = 0.5 * (rate_before + rate_after);
  r.step_times.resize(std::min<size_t>(r.step_times.size(), static_cast<size_t>(steps)));
  r.step_starts.resize(std::min<size_t>(r.step_starts.size(), static_cast<size_t>(steps)));
  const int64_t tokens_per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps *
                                  grid.dp_size() * cfg.data.seq_len;
  double timed = 0;
  for (size_t i = static_cast<size_t>(warmup); i < r.step_times.size(); ++i) timed += r.step_times[i];
  // Slowest rank decides.
  at::Tensor t = at::tensor({timed, r.comm_wait_seconds / std::max(r.step_seconds, 1e-12)}, at::kDouble);
  all_reduce_host(&grid.world(), t, ReduceOp::kMax, dev);
  timed = t[0].item<double>();
  double comm_share = t[1].item<double>();
  double tps = (steps - warmup) * tokens_per_step / timed;
  double fpt = training_flops_per_token(cfg.model, cfg.data.seq_len);
  double configured = cfg.train.peak_tflops * 1e12 * world->size();
  std::string configured_what = "train.peak_tflops";
  if (configured <= 0 && dev.is_cuda()) {  // the device's datasheet peak, when known
    std::string gpu = World::gpu_name(dev.index());
    configured = known_gpu_peak_tflops(gpu, cfg.precision.mode) * 1e12 * world->size();
    configured_what = "the dense " + cfg.precision.mode + " peak of " + gpu;
  }
  if (world->is_root()) {
    ParamCounts pc = count_parameters(cfg.model);
    std::printf("# bench train: %lld parameters, tp %d x dp %d%s, micro-batch %lld x accumulation %lld, seq %lld, %s, %d intra-op threads per rank\n",
                static_cast<long long>(pc.total), grid.tp_size(), grid.dp_size(),
                trainer.optimizer().sharded() ? " (distributed optimizer)" : "",
                static_cast<long long>(cfg.train.batch_size),
                static_cast<long long>(cfg.train.gradient_accumulation_steps),
                static_cast<long long>(cfg.data.seq_len), cfg.precision.mode.c_str(), at::get_num_threads());
    std::printf("steps timed        %lld (after %lld warmup)\n", static_cast<long long>(steps - warmup),
                static_cast<long long>(warmup));
    std::printf("step time          %.1f ms\n", 1000 * timed / (steps - warmup));
    std::printf("tokens/s           %.0f\n", tps);
    std::printf("model TFLOP/s      %.3f (%.2f MFLOP per token)\n", fpt * tps / 1e12, fpt / 1e6);
    if (configured > 0)
      std::printf("MFU                %.1f%% of %s x %d ranks\n", 100 * fpt * tps / configured,
                  configured_what.c_str(), world->size());
    else std::printf("MFU                unknown (set train.peak_tflops)\n");
    if (rate > 0)
      std::printf("MFU vs measured    %.1f%% of the %s matmul rate measured on the ranks (%.1f GFLOP/s in all: "
                  "%.1f before the steps, %.1f after)\n",
                  100 * fpt * tps / rate, matmul_dtype == at::kFloat ? "fp32" : "bf16", rate / 1e9,
                  rate_before / 1e9, rate_after / 1e9);
    std::printf("comm wait share    %.1f%% of step time waiting for the DP gradient %s\n", 100 * comm_share,
                trainer.optimizer().sharded() ? "reduce-scatter and parameter all-gather" : "all-reduce");
    // For profilers (scripts/profile_train.sh keeps the samples of this window).
    if (!r.step_starts.empty())
      std::printf("timed window       %.6f %.6f (rank 0, CLOCK_MONOTONIC seconds)\n",
                  r.step_starts[static_cast<size_t>(warmup)], r.step_starts.back() + r.step_times.back());
  }
  return 0;
}

}  // namespace andy
