// Trainer: the data x tensor parallel training loop behind `andyllm train`.
// One optimizer step = gradient_accumulation_steps micro-batches of train.batch_size sequences
// on every DP rank (global batch = batch_size x accumulation x dp_size sequences). Per step:
//   forward/backward of each micro-batch (autocast for bf16/fp16; loss scaled by the loss
//   scaler and divided by the accumulation steps) -> DP average by the GradReducer (only on the
//   last micro-step) -> unscale + found-inf (MAX over all ranks) -> skip, or clip by the global
//   norm (TP shards summed over TP, replicated parameters once) -> AdamW (fp32 master weights,
//   no decay on norms/embeddings unless configured) with warmup + cosine LR.
// Every `log_interval` steps rank 0 prints a progress line and appends to metrics.jsonl; every
// `eval_interval` steps the validation loss is measured on a fixed subset (the first
// eval_batches global batches of the unshuffled validation split, averaged over DP) and the
// best model is written to output_dir/best_model/. Checkpoints: launch/checkpoint.h.
// SIGTERM/SIGINT/SIGUSR1 on any rank: the ranks agree at the next step boundary (all-reduce MAX of a
// flag), write a checkpoint and run() returns normally.
// Construction and run() are collective over the grid's world communicator.
//
//   TrainGrid grid = TrainGrid::from(process_grid);
//   Trainer trainer(cfg, grid);
//   TrainResult r = trainer.run();
#pragma once

#include <torch/torch.h>

#include <array>
#include <cstdint>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/model/llama.h"
#include "data/loader.h"
#include "parallel/agreement.h"
#include "parallel/grad_reducer.h"
#include "parallel/process_grid.h"

namespace andy {


// Learning rate at optimizer step `step` (0-based): linear warmup over warmup_steps to
// learning_rate, then cosine decay to min_learning_rate at total_steps.
double learning_rate_at(const TrainConfig& t, int64_t step, int64_t total_steps);

// AdamW with fp32 state kept per parameter name (so it reshards like the weights).
// Matches torch.optim.AdamW: p *= 1 - lr * wd (decayed params only), bias-corrected moments.
class AdamW {
 public:
  struct Slot {
    std::string name;
    at::Tensor param;
    bool decay = true;
    at::Tensor exp_avg, exp_avg_sq;
  };
  AdamW(const std::vector<ParamInfo>& params, const TrainConfig& t);
  // grad_scale: gradient clipping's factor, applied inside the update (grads are not changed).
  // Sharded: the shard is updated bucket by bucket, and bucket_done(b) is called after bucket b
  // (the trainer starts its parameter all-gather there, overlapping the next buckets' updates).
  void step(double lr, double grad_scale = 1.0, const std::function<void(int)>& bucket_done = {});
  int64_t steps() const { return steps_; }
  void set_steps(int64_t s) { steps_ = s; }
  std::vector<Slot>& slots() { return slots_; }

  // ZeRO-1 (parallel.distributed_optimizer): from here on the moments are kept, and step()
  // updates, only this DP rank's pieces of the parameters (reducer.shard_segments(), whose
  // gradients are the DP-averaged shards); the slots' exp_avg / exp_avg_sq are then undefined
  // except around a checkpoint. Call before any step. The reducer must outlive the optimizer.
  void shard(const GradReducer& reducer);
  bool sharded() const { return reducer_ != nullptr; }
  // Bytes of AdamW moments this rank keeps (outside a checkpoint's full state).
  int64_t state_bytes() const;
  // Checkpoints of a sharded optimizer keep the unsharded format: gather_full_state() fills
  // every slot's moments on DP rank 0 from all DP ranks' shards (collective over DP), bucket by
  // bucket into host memory; a load puts the file's full moments in the slots, and
  // scatter_full_state() copies this rank's pieces of them into its shards;
  // release_full_state() frees the slots' moments. No-ops unless sharded.
  void gather_full_state();
  void scatter_full_state();
  void release_full_state();

 private:
  std::vector<Slot> slots_;
  const GradReducer* reducer_ = nullptr;
  std::vector<at::Tensor> shard_exp_avg_, shard_exp_avg_sq_;  // per bucket: this rank's shard
  std::vector<at::Tensor> seg_exp_avg_, seg_exp_avg_sq_;      // per shard segment: views of them
  // step()'s operands when sharded: per bucket, the decayed segments [0] and the others [1].
  struct ShardGroup {
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
  };
  std::vector<std::array<ShardGroup, 2>> shard_groups_;
  double beta1_, beta2_, eps_, weight_decay_;
  int64_t steps_ = 0;
};

// Dynamic loss scaling (fp16). With enabled = false the scale stays 1 and nothing is skipped
// unless a non-finite gradient is found (then the step is skipped as well).
class LossScaler {
 public:
  LossScaler(const PrecisionConfig& p, bool enabled);
  double scale() const { return enabled_ ? scale_ : 1.0; }
  bool enabled() const { return enabled_; }
  // found_inf_local: this rank saw a non-finite gradient. All-reduced MAX over `world` (null:
  // this rank only). Returns true when the step must be skipped; backs off on overflow, grows
  // by growth_factor after growth_interval good steps.
  // `device`: where the flag travels with the NCCL backend.
  bool update(bool found_inf_local, Communicator* world, at::Device device = at::Device(at::kCPU));
  int64_t growth_tracker() const { return good_steps_; }
  void set_state(double scale, int64_t good_steps) { scale_ = scale; good_steps_ = good_steps; }

 private:
  PrecisionConfig p_;
  bool enabled_;
  double scale_;
  int64_t good_steps_ = 0;
};

// Global L2 norm of the gradients of `params` over the TP group: squares of TP-sharded
// parameters summed over the group, replicated ones counted once. Same value on every rank.
double global_grad_norm(const std::vector<ParamInfo>& params, Communicator* tp);
// The same from this rank's sums of squares (sum_of_squares, core/model/fused_ops.h) of its
// TP-sharded and its replicated gradients.
double global_grad_norm(double sharded_sq, double replicated_sq, Communicator* tp, const at::Device& device);

struct TrainerOptions {
  int64_t sample_tokens = 48;  // tokens of the end-of-run sample (0: no sample)
  bool print_progress = true;  // progress lines and summaries on rank 0
  // Testing: on world rank `inject_inf_rank`, at step `inject_inf_step`, one gradient is set to
  // +inf after the DP reduction (exercises the found-inf agreement). -1: never; -2: every step.
  int inject_inf_rank = -1;
  int64_t inject_inf_step = -1;
  // Testing: run the dynamic loss scaler in fp32 too (its logic is device independent; fp16
  // itself does not run on CPU).
  bool force_loss_scaler = false;
  bool write_checkpoints = true;  // false: no checkpoints (benchmarks)
  // Called on every rank before each optimizer step with the number of steps this run has done
  // (benchmarks start a profiler there).
  std::function<void(int64_t)> before_step;
  // Testing: stop after this many steps of this run as if SIGTERM had arrived (-1: never).
  int64_t stop_after_steps = -1;
  // Testing: world rank `fail_checkpoint_rank` fails to write its part of the checkpoint of
  // step `fail_checkpoint_step`, as on a full disk (-1: never).
  int fail_checkpoint_rank = -1;
  int64_t fail_checkpoint_step = -1;
};

struct StepRecord {
  int64_t step = 0;  // 1-based optimizer step
  double loss = 0;   // mean training loss of the global batch
  double lr = 0, grad_norm = 0, loss_scale = 1;
  bool skipped = false;
};

struct TrainResult {
  std::vector<StepRecord> steps;  // the steps run by this call
  std::vector<std::pair<int64_t, double>> val_losses;  // (step, val loss)
  int64_t final_step = 0;
  int64_t start_step = 0;
  bool stopped_by_signal = false;
  double seconds = 0;
  double step_seconds = 0;       // inside optimizer steps (no evaluation, checkpoints)
  double comm_wait_seconds = 0;  // of which waiting for the DP gradient all-reduce
  std::vector<double> step_times;  // per step of this run
  std::vector<double> step_starts;  // per step: steady_clock seconds (CLOCK_MONOTONIC on Linux)
  std::string last_checkpoint;
  std::string sample;
};

class Trainer {
 public:
  Trainer(const Config& cfg, TrainGrid grid, TrainerOptions opts = {});
  ~Trainer();
  TrainResult run();

  LlamaForCausalLM& model() { return model_; }
  AdamW& optimizer() { return *optimizer_; }
  const GradReducer& grad_reducer() const { return *reducer_; }
  LossScaler& scaler() { return *scaler_; }
  int64_t total_steps() const { return total_steps_; }
  const Config& config() const { return cfg_; }
  const TrainerOptions& options() const { return opts_; }
  const TrainGrid& grid() const { return grid_; }
  data::DataLoader& train_loader() { return *train_; }
  int64_t step() const { return step_; }
  void set_step(int64_t s) { step_ = s; }
  const std::vector<ParamInfo>& params() const { return params_; }
  double best_val_loss() const { return best_val_; }
  void set_best_val_loss(double v) { best_val_ = v; }
  at::Device device() const { return device_; }
  // The checkpoint this run resumes from ("" = a fresh run), resolved at construction.
  const std::string& resume_dir() const { return resume_dir_; }

  // Validation loss on the fixed subset, averaged over DP (NaN without a validation split).
  double evaluate();
  // Generates `n` tokens after `prompt` (top-k 40, temperature 0.8, seeded): the same on every
  // rank. Collective over TP. Needs the tokenizer at data.tokenizer_path.
  std::string sample(const std::string& prompt, int64_t n);

 private:
  void write_metrics(const std::string& json_line);
  // Writes output_dir/best_model/ (full weights, config, meta.json with the validation loss)
  // through best_model.tmp/ and an atomic exchange. Collective: a failure is agreed.
  void save_best_model(double val_loss);
  void write_best_model(const StateDict& full, const std::string& dir, const std::string& tmp,
                        double val_loss);
  // Start of run(): adopts the best_model/ on disk's validation loss, warns about checkpoints
  // of later steps than the one resumed.
  void note_earlier_results(bool log_it);
  // Rank 0: warnings about the data setup (identical train and validation paths, eval_batches
  // beyond the validation split).
  void warn_about_data_setup() const;
  // Rank 0 on resume: metrics.jsonl keeps only rows up to `step` (atomic rewrite).
  void truncate_metrics_after(int64_t step);
  // Throws an agreed Error (every rank, reported once) when the step's loss is not finite, a
  // gradient is not finite without fp16 loss scaling, or fp16 skipped more than
  // train.max_skipped_steps steps in a row.
  void stop_if_diverged(const StepRecord& rec, bool skipped, int64_t consecutive_skips);

  // run(), as its steps. A throughput interval: from one progress line to the next.
  struct Interval {
    std::chrono::steady_clock::time_point start;
    int64_t steps = 0;
    double excluded_seconds = 0;  // evaluation and checkpoints inside the interval
    double comm_wait = 0;         // waiting for the DP gradient all-reduce
    double loss_sum = 0;
  };
  struct RunState {
    bool root = false;  // rank 0 and printing progress
    std::chrono::steady_clock::time_point start;
    Interval interval;
    int64_t steps_this_run = 0;
    int64_t consecutive_skips = 0;
    double tokens_per_step = 0, flops_per_token = 0, peak_flops = 0;
  };
  // Resume, earlier results, the setup line, the untrained model's validation loss.
  void begin_run(TrainResult& result, const RunState& rs);
  // The FLOP/s MFU is quoted against: train.peak_tflops, a known GPU's peak, or the measured
  // fp32 matmul rate of the ranks on CPU (collective), 0 when unknown.
  double peak_flops(bool root);
  // Agreed over the world: a stop signal on any rank (or the testing stop_after_steps).
  bool stop_requested(const RunState& rs);
  // One optimizer step: micro-batches forward and backward, the DP reduction, unscaling, the
  // scaler's skip decision, clipping and the update.
  StepRecord train_step(TrainResult& result, RunState& rs);
  double forward_backward(double scale);             // returns the summed micro-batch losses
  // This rank's gradients: unscaled (fp16), their sums of squares kept for clip_and_apply.
  bool unscale_and_find_nonfinite(double scale);
  double grad_sq_sharded_ = 0, grad_sq_replicated_ = 0;
  void clip_and_apply(StepRecord& rec);               // sets rec.grad_norm, steps AdamW
  double gather_params();                             // distributed optimizer; seconds waited
  void log_progress(const StepRecord& rec, RunState& rs);
  void evaluate_if_due(TrainResult& result, RunState& rs);
  void checkpoint_if_due(TrainResult& result, RunState& rs);
  // The final checkpoint, the run's totals and the sample.
  void end_run(TrainResult& result, const RunState& rs);

  Config cfg_;
  TrainGrid grid_;
  TrainerOptions opts_;
  at::Device device_;
  LlamaForCausalLM model_{nullptr};
  std::vector<ParamInfo> params_;
  std::unique_ptr<GradReducer> reducer_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<LossScaler> scaler_;
  std::unique_ptr<data::DataLoader> train_;
  std::unique_ptr<data::DataLoader> val_;
  int64_t total_steps_ = 0;
  std::string resume_dir_;  // checkpoint.resume resolved at construction ("" = start fresh)
  int64_t step_ = 0;
  double best_val_;
};


// Matmul rate of this process in `dtype` (1024^3 products for about 0.3 s at LibTorch's current
// threads, fp32 through oneDNN's sgemm when the linears use it), in FLOP/s: the "measured peak"
// MFU is quoted against on CPU.
double measure_matmul_flops(at::ScalarType dtype = at::kFloat);
// The dtype a CPU run's matmuls take for precision.mode: bf16 under bf16 autocast (oneDNN), else
// fp32. MFU on CPU is quoted against that dtype's measured rate.
inline at::ScalarType cpu_matmul_dtype(const std::string& precision_mode) {
  return precision_mode == "bf16" ? at::kBFloat16 : at::kFloat;
}

// Installs SIGTERM/SIGINT/SIGUSR1 handlers that set a flag read by Trainer::run and the server
// (idempotent). With `second_signal_exits` (serve), a signal after the first one takes its
// default action at once; training keeps one graceful stop however many signals arrive.
void install_stop_signal_handlers(bool second_signal_exits = false);
bool stop_signal_received();

}  // namespace andy
