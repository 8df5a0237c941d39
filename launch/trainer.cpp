// The training loop (see trainer.h): step, optimizer, LR schedule, clipping, loss scaler,
// validation, logging, signals, end-of-run sample.
#include "launch/trainer.h"

#include <ATen/CPUGeneratorImpl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <mutex>
#include <sstream>
#include <thread>

#include "core/base/durable_fs.h"
#include "core/base/format.h"
#include "core/base/logging.h"
#include "core/base/torch_compat.h"
#include "core/model/fused_ops.h"
#include "core/model/model_stats.h"
#include "data/checksum.h"
#include "data/tokenizer.h"
#include "core/model/weights_io.h"
#include "launch/checkpoint.h"
#include "parallel/cpu_gemm.h"
#include "parallel/tp_partition.h"
#include "parallel/world.h"

namespace andy {

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop_signal{0};
std::atomic<bool> g_second_signal_exits{false};

// Async-signal-safe: atomics, signal() and raise() only.
extern "C" void on_stop_signal(int sig) {
  if (g_second_signal_exits.load() && g_stop_signal.load() != 0) {
    std::signal(sig, SIG_DFL);  // the second one: the default action, now
    std::raise(sig);
    return;
  }
  g_stop_signal.store(sig);
}

// The lower-precision dtype of a bf16 / fp16 run (autocast's, and the residual stream's when
// precision.fp32_residual = false).
at::ScalarType reduced_dtype(const std::string& mode) { return mode == "bf16" ? at::kBFloat16 : at::kHalf; }

// Autocast on for the scope (bf16/fp16), restoring the previous state. Autocast's casts of the
// weights stay cached after the scope (a step's micro-batches use the same weights: each is cast
// once per step, not once per micro-batch) until a ClearAutocastCacheAtExit ends (the step's
// forward_backward, an evaluation).
class AutocastScope {
 public:
  AutocastScope(const std::string& mode, at::Device device) {
    if (mode == "fp32") return;
    type_ = device.type();
    compat::set_autocast(type_, true, reduced_dtype(mode));
    on_ = true;
  }
  ~AutocastScope() {
    if (on_) compat::set_autocast(type_, false, at::kBFloat16);
  }

 private:
  bool on_ = false;
  at::DeviceType type_ = at::kCPU;
};

// Drops autocast's cached weight casts (they hold the weights' values before the update).
struct ClearAutocastCacheAtExit {
  ~ClearAutocastCacheAtExit() { at::autocast::clear_cache(); }
};

at::Device pick_device(const Config& cfg, const TrainGrid& grid) {
  if (cfg.train.device == "cpu") return at::Device(at::kCPU);
  ANDY_CHECK_T(ConfigError, at::hasCUDA(),
               "[train] device = \"cuda\" (", cfg.origin_of("train.device"),
               "): no GPU is visible to this LibTorch (",
               compat::torch_has_cuda() ? "built with CUDA but no device found" : "a CPU-only build",
               "); use --device cpu");
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(std::max(0, grid.cuda_device)));
}

}  // namespace

double measure_matmul_flops(at::ScalarType dtype) {
  at::NoGradGuard no_grad;
  const int64_t n = 1024;
  at::Tensor a = at::randn({n, n}).to(dtype), b = at::randn({n, n}).to(dtype);
  at::Tensor c = at::mm(a, b);
  // The path the model's fp32 linears take: oneDNN's sgemm where available (parallel/cpu_gemm.h).
  const bool onednn = dtype == at::kFloat && cpu_gemm_enabled();
  auto product = [&] {
    if (onednn) cpu_sgemm(false, false, n, n, n, a.data_ptr<float>(), n, b.data_ptr<float>(), n, c.data_ptr<float>(), n);
    else at::mm_out(c, a, b);
  };
  // The rate over `seconds` (at least 3 products).
  auto window = [&](double seconds) {
    int reps = 0;
    const auto t0 = std::chrono::steady_clock::now();
    double dt = 0;
    while (dt < seconds || reps < 3) {
      product();
      ++reps;
      dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    return 2.0 * n * n * n * reps / dt;
  };
  // The first 0.1 s runs 10-20 % slower (the kernel's first calls, the core's clock): not timed.
  // Then the median of three windows, so one disturbed window does not move the figure.
  window(0.1);
  double rates[3] = {window(0.1), window(0.1), window(0.1)};
  std::sort(rates, rates + 3);
  return rates[1];
}

void install_stop_signal_handlers(bool second_signal_exits) {
  g_second_signal_exits.store(second_signal_exits);
  std::signal(SIGTERM, on_stop_signal);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGUSR1, on_stop_signal);  // mpirun forwards it at once (scripts/mpirun.sh)
  // The signals are taken by a thread of their own, never by the calling (compute) thread or the
  // threads it starts later (communication, OpenMP, HTTP): a handler run on a thread that is in
  // oneDNN's JIT-compiled sgemm was followed by heap corruption (1 stop in 60 and 1 in 20 in
  // TrainE2e.SigusrToPlainMpirunCheckpointsAndExitsZero; none in 60 with OpenBLAS, none in about
  // 100 with this thread). Why is not known; threads started before this call (MPI's, LibTorch's
  // OpenMP pool if already up) may still take the signals.
  sigset_t stops;
  sigemptyset(&stops);
  sigaddset(&stops, SIGTERM);
  sigaddset(&stops, SIGINT);
  sigaddset(&stops, SIGUSR1);
  static std::once_flag once;
  std::call_once(once, [stops] {
    std::thread([stops] {
      pthread_sigmask(SIG_UNBLOCK, &stops, nullptr);
      while (true) pause();  // the handler runs here
    }).detach();
  });
  pthread_sigmask(SIG_BLOCK, &stops, nullptr);
}
bool stop_signal_received() { return g_stop_signal.load() != 0; }

double learning_rate_at(const TrainConfig& t, int64_t step, int64_t total_steps) {
  if (t.warmup_steps > 0 && step < t.warmup_steps)
    return t.learning_rate * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps);
  int64_t decay_steps = std::max<int64_t>(1, total_steps - t.warmup_steps);
  double progress = std::min(1.0, static_cast<double>(step - t.warmup_steps) / decay_steps);
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return t.min_learning_rate + (t.learning_rate - t.min_learning_rate) * cosine;
}

// ---- AdamW -------------------------------------------------------------------------------

AdamW::AdamW(const std::vector<ParamInfo>& params, const TrainConfig& t)
    : beta1_(t.beta1), beta2_(t.beta2), eps_(t.adam_eps), weight_decay_(t.weight_decay) {
  for (const auto& p : params) {
    Slot s;
    s.name = p.name;
    s.param = p.param;
    s.decay = t.decay_norms_and_embeddings || !(p.is_norm || p.is_embedding);
    s.exp_avg = at::zeros_like(p.param, p.param.options().dtype(at::kFloat));
    s.exp_avg_sq = at::zeros_like(p.param, p.param.options().dtype(at::kFloat));
    slots_.push_back(std::move(s));
  }
}

void AdamW::step(double lr, double grad_scale, const std::function<void(int)>& bucket_done) {
  at::NoGradGuard no_grad;
  ++steps_;
  AdamWHyper h;
  h.lr = lr;
  h.beta1 = beta1_;
  h.beta2 = beta2_;
  h.eps = eps_;
  h.bc1 = 1.0 - std::pow(beta1_, static_cast<double>(steps_));
  h.bc2 = 1.0 - std::pow(beta2_, static_cast<double>(steps_));
  h.grad_scale = grad_scale;
  // Two groups, decayed and not (one multi-tensor update each on CUDA; fused per parameter on CPU).
  if (sharded()) {
    for (size_t b = 0; b < shard_groups_.size(); ++b) {
      for (const bool decay : {true, false}) {
        const ShardGroup& g = shard_groups_[b][decay ? 0 : 1];
        h.weight_decay = decay ? weight_decay_ : 0.0;
        adamw_update_group(g.params, g.grads, g.exp_avgs, g.exp_avg_sqs, h, steps_);
      }
      if (bucket_done) bucket_done(static_cast<int>(b));
    }
    return;
  }
  for (const bool decay : {true, false}) {
    std::vector<at::Tensor> params, grads, exp_avgs, exp_avg_sqs;
    for (auto& s : slots_) {
      if (s.decay != decay || !s.param.grad().defined()) continue;
      params.push_back(s.param);
      grads.push_back(s.param.grad());
      exp_avgs.push_back(s.exp_avg);
      exp_avg_sqs.push_back(s.exp_avg_sq);
    }
    h.weight_decay = decay ? weight_decay_ : 0.0;
    adamw_update_group(params, grads, exp_avgs, exp_avg_sqs, h, steps_);
  }
}

void AdamW::shard(const GradReducer& reducer) {
  ANDY_CHECK(reducer.sharded(), "AdamW::shard: the gradient reducer is not sharded");
  ANDY_CHECK(steps_ == 0, "AdamW::shard: call before the first step");
  reducer_ = &reducer;
  const auto& segs = reducer.shard_segments();
  for (int b = 0; b < reducer.num_buckets(); ++b) {
    const auto opts = slots_.at(reducer.bucket_params(b).at(0)).param.options().dtype(at::kFloat);
    shard_exp_avg_.push_back(at::zeros({reducer.shard_numel(b)}, opts));
    shard_exp_avg_sq_.push_back(at::zeros({reducer.shard_numel(b)}, opts));
  }
  // The update's operands are views into buffers that never move: grouped once, by bucket and
  // by decay, here.
  shard_groups_.resize(reducer.num_buckets());
  for (const auto& seg : segs) {
    seg_exp_avg_.push_back(shard_exp_avg_[seg.bucket].narrow(0, seg.shard_offset, seg.numel));
    seg_exp_avg_sq_.push_back(shard_exp_avg_sq_[seg.bucket].narrow(0, seg.shard_offset, seg.numel));
    ShardGroup& g = shard_groups_[seg.bucket][slots_.at(seg.param).decay ? 0 : 1];
    g.params.push_back(seg.param_part);
    g.grads.push_back(seg.grad_part);
    g.exp_avgs.push_back(seg_exp_avg_.back());
    g.exp_avg_sqs.push_back(seg_exp_avg_sq_.back());
  }
  release_full_state();
}

int64_t AdamW::state_bytes() const {
  int64_t n = 0;
  if (sharded())
    for (size_t b = 0; b < shard_exp_avg_.size(); ++b) n += shard_exp_avg_[b].numel() + shard_exp_avg_sq_[b].numel();
  else
    for (const auto& s : slots_) n += s.exp_avg.numel() + s.exp_avg_sq.numel();
  return n * static_cast<int64_t>(sizeof(float));
}

void AdamW::gather_full_state() {
  if (!sharded()) return;
  // Into DP rank 0 (the one that writes checkpoints); the others' slots stay empty.
  at::NoGradGuard no_grad;
  const CommPtr& dp = reducer_->dp();
  for (int b = 0; b < reducer_->num_buckets(); ++b) {
    at::Tensor full[2];
    std::vector<WorkPtr> works;
    const std::vector<at::Tensor>* shards[2] = {&shard_exp_avg_, &shard_exp_avg_sq_};
    const bool root = dp->rank() == 0;
    for (int i = 0; i < 2; ++i) {
      full[i] = at::empty({root ? reducer_->shard_numel(b) * dp->size() : 0}, (*shards[i])[b].options());
      works.push_back(dp->gather(full[i], (*shards[i])[b], 0));
    }
    for (auto& w : works) w->wait();
    if (!root) continue;
    const auto params = reducer_->bucket_params(b);
    for (size_t s = 0; s < params.size(); ++s) {
      Slot& slot = slots_.at(params[s]);
      const int64_t off = reducer_->bucket_param_offset(b, s), n = slot.param.numel();
      // Copies of their own (a view would take the bucket's whole storage into the file), in
      // host memory (the full state of a large model does not fit beside it on one GPU).
      auto own_host_copy = [&](const at::Tensor& t) {
        at::Tensor v = t.narrow(0, off, n).view(slot.param.sizes());
        return v.is_cpu() ? v.clone() : v.cpu();
      };
      slot.exp_avg = own_host_copy(full[0]);
      slot.exp_avg_sq = own_host_copy(full[1]);
    }
  }
}

void AdamW::scatter_full_state() {
  if (!sharded()) return;
  at::NoGradGuard no_grad;
  const auto& segs = reducer_->shard_segments();
  for (size_t i = 0; i < segs.size(); ++i) {
    const Slot& slot = slots_.at(segs[i].param);
    ANDY_CHECK(slot.exp_avg.defined() && slot.exp_avg_sq.defined(), "AdamW::scatter_full_state: no full moments for ",
               slot.name);
    seg_exp_avg_[i].copy_(slot.exp_avg.reshape({-1}).narrow(0, segs[i].param_offset, segs[i].numel));
    seg_exp_avg_sq_[i].copy_(slot.exp_avg_sq.reshape({-1}).narrow(0, segs[i].param_offset, segs[i].numel));
  }
  release_full_state();
}

void AdamW::release_full_state() {
  if (!sharded()) return;
  for (auto& s : slots_) s.exp_avg = s.exp_avg_sq = at::Tensor();
}

// ---- LossScaler ----------------------------------------------------------------------------

LossScaler::LossScaler(const PrecisionConfig& p, bool enabled)
    : p_(p), enabled_(enabled), scale_(p.loss_scale_init) {}

bool LossScaler::update(bool found_inf_local, Communicator* world, at::Device device) {
  at::Tensor flag = at::full({1}, found_inf_local ? 1.0f : 0.0f, at::kFloat);
  all_reduce_host(world, flag, ReduceOp::kMax, device);
  bool found = flag.item<float>() > 0;
  if (!enabled_) return found;
  if (found) {
    scale_ = std::max(p_.loss_scale_min, scale_ * p_.loss_scale_backoff);
    good_steps_ = 0;
    return true;
  }
  if (++good_steps_ >= p_.loss_scale_growth_interval) {
    scale_ *= p_.loss_scale_growth_factor;
    good_steps_ = 0;
  }
  return false;
}

double global_grad_norm(double sharded_sq, double replicated_sq, Communicator* tp, const at::Device& device) {
  at::Tensor sharded = at::full({1}, sharded_sq, at::kDouble);
  all_reduce_host(tp, sharded, ReduceOp::kSum, device);
  return std::sqrt(sharded.item<double>() + replicated_sq);
}

double global_grad_norm(const std::vector<ParamInfo>& params, Communicator* tp) {
  at::NoGradGuard no_grad;
  double sharded = 0, replicated = 0;
  for (const auto& p : params) {
    at::Tensor g = p.param.grad();
    if (!g.defined()) continue;
    (p.tp_sharded() ? sharded : replicated) += sum_of_squares(g);
  }
  return global_grad_norm(sharded, replicated, tp, params.empty() ? at::Device(at::kCPU) : params[0].param.device());
}

// ---- Trainer -------------------------------------------------------------------------------

Trainer::Trainer(const Config& cfg, TrainGrid grid, TrainerOptions opts)
    : cfg_(cfg), grid_(std::move(grid)), opts_(opts), device_(pick_device(cfg, grid_)),
      best_val_(std::numeric_limits<double>::infinity()) {
  ANDY_CHECK_T(ConfigError, grid_.tp_size() == cfg_.parallel.tensor_parallel_size,
               "trainer: grid TP size ", grid_.tp_size(), " != parallel.tensor_parallel_size ",
               cfg_.parallel.tensor_parallel_size);
  if (cfg_.precision.mode == "fp16" && device_.is_cpu())
    throw ConfigError("precision.mode = fp16 cannot run on CPU (no fp16 matmul in LibTorch); use "
                      "precision.mode = bf16 on CPU, or --device cuda");
  model_ = LlamaForCausalLM(cfg_.model, grid_.tp, static_cast<uint64_t>(cfg_.train.seed));
  model_->to(device_);
  if (cfg_.precision.mode != "fp32" && !cfg_.precision.fp32_residual)
    model_->set_residual_dtype(reduced_dtype(cfg_.precision.mode));
  params_ = model_->param_infos();
  std::vector<at::Tensor> tensors;
  for (const auto& p : params_) tensors.push_back(p.param);
  reducer_ = std::make_unique<GradReducer>(
      tensors, grid_.dp, GradReducerOptions()
                   .set_bucket_mb(cfg_.train.bucket_size_mb)
                   .set_first_bucket_mb(cfg_.train.first_bucket_mb)
                   .set_shard(cfg_.parallel.distributed_optimizer));
  optimizer_ = std::make_unique<AdamW>(params_, cfg_.train);
  if (reducer_->sharded()) optimizer_->shard(*reducer_);
  scaler_ = std::make_unique<LossScaler>(cfg_.precision, cfg_.precision.mode == "fp16" || opts_.force_loss_scaler);

  // An unfinished preprocess (killed) is named before anything else about the data.
  if (fs::is_directory(cfg_.data.train_file)) {
    try {
      data::resolve_split(cfg_.data.train_file);
    } catch (const IoError& e) {
      throw ConfigError(e.what());
    }
  }
  std::string checksum, legacy_checksum;
  if (fs::exists(cfg_.data.tokenizer_path)) {
    checksum = data::file_checksum(cfg_.data.tokenizer_path);
    legacy_checksum = data::file_checksum(cfg_.data.tokenizer_path, /*legacy=*/true);
  } else
    throw ConfigError("data.tokenizer_path = " + cfg_.data.tokenizer_path + " (" +
                      cfg_.origin_of("data.tokenizer_path") +
                      "): no such file; run `andyllm preprocess` first (see docs/DATA.md)");
  data::LoaderOptions o;
  o.split = cfg_.data.train_file;
  o.seq_len = cfg_.data.seq_len;
  o.batch_size = cfg_.train.batch_size;
  o.dp_rank = grid_.dp_rank();
  o.dp_size = grid_.dp_size();
  o.seed = static_cast<uint64_t>(cfg_.train.seed);
  o.expected_vocab_size = cfg_.model.vocab_size;
  o.tokenizer_checksum = checksum;
  o.tokenizer_checksum_legacy = legacy_checksum;
  o.prefetch_batches = cfg_.data.prefetch_batches;
  o.verify_checksums = cfg_.data.verify_checksums;
  // Damaged or missing data is the user's input: a ConfigError (exit 2), like a bad key.
  try {
    train_ = std::make_unique<data::DataLoader>(o);
    if (!cfg_.data.val_file.empty()) {
      data::LoaderOptions v = o;
      v.split = cfg_.data.val_file;
      v.shuffle = false;
      v.prefetch_batches = 0;
      val_ = std::make_unique<data::DataLoader>(v);
    }
  } catch (const IoError& e) {
    throw ConfigError(e.what());
  }
  warn_about_data_setup();
  // A bad --resume (no such directory, `latest` naming an incomplete checkpoint) is found here,
  // during setup, which cmd_train agrees across ranks; run() loads it.
  resume_dir_ = resolve_resume_path(cfg_);
  // A run that writes no checkpoints (bench train) cannot mix with an earlier run's.
  if (opts_.write_checkpoints) check_fresh_start(cfg_, resume_dir_);
  if (!resume_dir_.empty()) check_resume_checkpoint(cfg_, resume_dir_, grid_.tp_rank(), grid_.tp_size());
  const int64_t accum = cfg_.train.gradient_accumulation_steps;
  if (cfg_.train.max_steps > 0) {
    total_steps_ = cfg_.train.max_steps;
  } else {
    int64_t per_epoch = train_->steps_per_epoch() / accum;
    ANDY_CHECK_T(ConfigError, per_epoch >= 1, "data.train_file ", cfg_.data.train_file, " has ",
                 train_->steps_per_epoch(), " micro-batches per epoch, fewer than "
                 "train.gradient_accumulation_steps = ", accum, ": lower it or the batch size");
    total_steps_ = per_epoch * cfg_.train.num_epochs;
  }
}

Trainer::~Trainer() = default;

void Trainer::warn_about_data_setup() const {
  if (grid_.rank() != 0 || !opts_.print_progress) return;
  const auto& d = cfg_.data;
  if (!d.val_file.empty() && fs::weakly_canonical(d.val_file) == fs::weakly_canonical(d.train_file))
    log::warn("data.val_file and data.train_file are the same (", d.train_file,
              "): the validation loss will measure memorisation, not generalisation");
  if (val_ && cfg_.train.eval_batches > val_->steps_per_epoch())
    log::warn("train.eval_batches = ", cfg_.train.eval_batches, " but the validation split has only ",
              val_->steps_per_epoch(), " global batches: each evaluation uses ", val_->steps_per_epoch());
}

void Trainer::write_metrics(const std::string& line) {
  if (grid_.rank() != 0 || !opts_.print_progress) return;
  fs::create_directories(cfg_.train.output_dir);
  std::ofstream f(cfg_.train.output_dir + "/metrics.jsonl", std::ios::app);
  f << line << "\n";
}

double Trainer::evaluate() {
  if (!val_) return std::numeric_limits<double>::quiet_NaN();
  at::NoGradGuard no_grad;
  // Casts made without gradients must not reach a training step's backward.
  ClearAutocastCacheAtExit clear_casts;
  val_->seek({0, 0});
  int64_t n = std::min<int64_t>(cfg_.train.eval_batches, val_->steps_per_epoch());
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    data::Batch b = val_->next_batch();
    AutocastScope ac(cfg_.precision.mode, device_);
    at::Tensor logits = model_->forward(b.input.to(device_));
    sum += model_->loss(logits, b.target.to(device_)).item<double>();
  }
  at::Tensor t = at::full({1}, sum / static_cast<double>(n), at::kDouble);
  all_reduce_host(grid_.dp.get(), t, ReduceOp::kAvg, device_);
  return t.item<double>();
}

void Trainer::save_best_model(double val_loss) {
  StateDict full = model_->full_state_dict();  // collective over TP
  const std::string dir = cfg_.train.output_dir + "/best_model";
  const std::string tmp = dir + ".tmp";
  std::string err;
  if (grid_.rank() == 0) {
    try {
      write_best_model(full, dir, tmp, val_loss);
    } catch (const std::exception& e) {
      err = describe_write_failure("best_model", tmp, e);
    }
  }
  // A failure is agreed (every rank throws, rank 0 removes best_model.tmp); the previous
  // best_model stays whole.
  agree_or_throw(grid_, err, device_, tmp);
}

void Trainer::write_best_model(const StateDict& full, const std::string& dir,
                               const std::string& tmp, double val_loss) {
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  write_full_weights(full, tmp + "/model.pt");
  write_file_durable(tmp + "/config.toml", config_to_toml(cfg_));
  std::ostringstream readme;
  readme << "best model by validation loss at step " << step_ << " (val_loss " << val_loss
         << ")\nmodel.pt: full (unsharded) Hugging Face named tensors, '.' written as '/',"
            " LibTorch archive (torch::serialize::InputArchive)\n";
  write_file_durable(tmp + "/README.txt", readme.str());
  std::ostringstream meta;
  meta << "{\"format_version\": 1, \"step\": " << step_ << ", \"val_loss\": " << json_number(val_loss) << "}\n";
  write_file_durable(tmp + "/meta.json", meta.str());
  fsync_path(tmp);
  // Publish: an atomic exchange with the previous best_model (never a moment without one),
  // then the old one, now under the temporary name, is removed.
  if (fs::exists(dir)) {
    std::string note = exchange_paths(tmp, dir);
    if (!note.empty()) log::warn("best_model: ", note);
    fs::remove_all(tmp);
  } else {
    fs::rename(tmp, dir);
  }
  fsync_path(cfg_.train.output_dir);
}

// The sample printed after training: top-k sampling at a fixed temperature, seeded from the run.
constexpr double kSampleTemperature = 0.8;
constexpr int64_t kSampleTopK = 40;
constexpr int64_t kSampleBlockSize = 16;             // KV-cache block, in tokens
constexpr uint64_t kSampleSeedSalt = 0x5eedULL;      // the sample's generator: train.seed ^ salt

std::string Trainer::sample(const std::string& prompt, int64_t n) {
  at::NoGradGuard no_grad;
  data::Tokenizer tok = data::Tokenizer::load(cfg_.data.tokenizer_path);
  std::vector<int32_t> ids = tok.encode(prompt);
  if (ids.empty()) ids.push_back(tok.bos_id());
  n = std::min<int64_t>(n, cfg_.model.max_seq_len - static_cast<int64_t>(ids.size()));
  if (n <= 0) return prompt;
  const int64_t block = kSampleBlockSize;
  KvCache cache(cfg_.model, grid_.tp_size(), block,
                (cfg_.model.max_seq_len + block - 1) / block + 1,
                at::TensorOptions().dtype(at::kFloat).device(device_));
  std::vector<KvSequence> seqs(1);
  cache.reserve(seqs[0], static_cast<int64_t>(ids.size()) + n);
  std::vector<int64_t> prompt64(ids.begin(), ids.end());
  at::Tensor input = at::tensor(prompt64, at::kLong).view({1, -1}).to(device_);
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(
      static_cast<uint64_t>(cfg_.train.seed) ^ kSampleSeedSalt);
  std::vector<int32_t> out;
  for (int64_t i = 0; i < n; ++i) {
    at::Tensor local = model_->forward_cached(input, cache, seqs);
    at::Tensor logits = model_->gather_logits(local).select(1, -1).to(at::kFloat).cpu();  // [1, V]
    auto topk = logits.div(kSampleTemperature).topk(kSampleTopK, -1);
    at::Tensor probs = at::softmax(std::get<0>(topk), -1);
    int64_t pick = at::multinomial(probs, 1, false, gen).item<int64_t>();
    int64_t next = std::get<1>(topk)[0][pick].item<int64_t>();
    if (next == tok.eos_id()) break;
    out.push_back(static_cast<int32_t>(next));
    input = at::full({1, 1}, next, at::kLong).to(device_);
  }
  return prompt + tok.decode(out);
}

void Trainer::truncate_metrics_after(int64_t step) {
  // Rows of steps after the resumed one were written by the run that stopped later (a crash
  // after the checkpoint): they are replaced by this run's, so the file shows one run.
  const std::string path = cfg_.train.output_dir + "/metrics.jsonl";
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  int64_t dropped = 0;
  while (std::getline(in, line)) {
    const auto at = line.find("\"step\": ");
    int64_t s = -1;
    try {
      if (at != std::string::npos) s = std::stoll(line.substr(at + 8));
    } catch (const std::exception&) {
    }
    if (s > step) {
      ++dropped;
      continue;
    }
    kept += line + "\n";
  }
  in.close();
  if (dropped == 0) return;
  write_file_durable(path, kept);
  if (opts_.print_progress) log::info("metrics.jsonl: dropped ", dropped, " row(s) after the resumed step ", step);
}

void Trainer::note_earlier_results(bool log_it) {
  // The best_model on disk may be better than this checkpoint's record (a resume from an
  // older step): it is replaced only by a better one.
  const double on_disk = best_model_val_loss(cfg_.train.output_dir);
  if (std::isfinite(on_disk) && !(best_val_ <= on_disk)) {
    best_val_ = on_disk;
    if (log_it)
      log::info("best_model/ holds val_loss ", format_printf("%.4f", on_disk),
                ": it is replaced only by a better model");
  }
  if (resume_dir_.empty() || !log_it) return;
  std::vector<std::string> later;
  const std::string root = cfg_.train.output_dir + "/checkpoints";
  for (int64_t s : complete_checkpoint_steps(root))
    if (s > step_) later.push_back(checkpoint_dir_name(s));
  if (!later.empty())
    log::warn(root, " holds ", later.size(), " checkpoint(s) after step ", step_, " (",
              later.front(), later.size() > 1 ? " .. " + later.back() : "",
              "): they are kept, never pruned by this run; 'latest' will name this run's checkpoints");
}

void Trainer::stop_if_diverged(const StepRecord& rec, bool skipped, int64_t consecutive_skips) {
  // The loss is the DP mean and the skip flag is agreed over the world: every rank decides the
  // same, before the optimizer step, so nothing non-finite reaches the weights or a checkpoint.
  const bool scaled = scaler_->enabled();
  std::string why;
  if (!std::isfinite(rec.loss))
    why = "the training loss is " + std::to_string(rec.loss);
  else if (skipped && !scaled)
    why = "a gradient is not finite (" + cfg_.precision.mode + " has no loss scaling to recover)";
  else if (skipped && consecutive_skips > cfg_.train.max_skipped_steps)
    why = std::to_string(consecutive_skips) + " consecutive steps overflowed in fp16 (more than train.max_skipped_steps = " +
          std::to_string(cfg_.train.max_skipped_steps) + ")";
  if (why.empty()) return;
  const std::string latest = cfg_.train.output_dir + "/checkpoints/latest";
  throw Agreed<Error>("training diverged at step " + std::to_string(rec.step) + ": " + why +
                          ". Nothing non-finite was saved; lower train.learning_rate or raise train.warmup_steps, "
                          "then resume from the last checkpoint (" + latest + ")",
                      grid_.rank() == 0);
}

TrainResult Trainer::run() {
  TrainResult result;
  install_stop_signal_handlers();
  RunState rs;
  rs.root = grid_.rank() == 0 && opts_.print_progress;
  rs.tokens_per_step = static_cast<double>(cfg_.train.batch_size * cfg_.train.gradient_accumulation_steps *
                                           grid_.dp_size() * cfg_.data.seq_len);
  begin_run(result, rs);
  rs.flops_per_token = training_flops_per_token(cfg_.model, cfg_.data.seq_len);
  rs.peak_flops = peak_flops(rs.root);
  rs.start = rs.interval.start = std::chrono::steady_clock::now();
  while (step_ < total_steps_) {
    if (stop_requested(rs)) {
      result.last_checkpoint = save_checkpoint(*this);
      result.stopped_by_signal = true;
      break;
    }
    const StepRecord rec = train_step(result, rs);
    result.steps.push_back(rec);
    if (step_ % cfg_.train.log_interval == 0 || step_ == total_steps_) log_progress(rec, rs);
    evaluate_if_due(result, rs);
    checkpoint_if_due(result, rs);
  }
  end_run(result, rs);
  return result;
}

void Trainer::begin_run(TrainResult& result, const RunState& rs) {
  const auto& t = cfg_.train;
  if (!resume_dir_.empty()) {
    load_checkpoint(*this, resume_dir_);
    if (rs.root) log::info("resumed from ", resume_dir_, " at step ", step_);
  }
  result.start_step = step_;
  note_earlier_results(rs.root);
  if (!resume_dir_.empty() && grid_.rank() == 0) truncate_metrics_after(step_);
  if (!resume_dir_.empty() && step_ >= total_steps_) {
    result.last_checkpoint = resume_dir_;
    if (rs.root)
      log::warn("the checkpoint is at step ", step_, ", already at the end of this run's ",
                total_steps_, " steps: nothing to train (raise train.max_steps / num_epochs, or "
                "start fresh in another --output_dir, or with --resume none --set checkpoint.existing=archive)");
  }
  if (rs.root) {
    const int64_t accum = t.gradient_accumulation_steps;
    log::info("training ", total_steps_, " steps: world ", grid_.world_size(), " = tp ",
              grid_.tp_size(), " x dp ", grid_.dp_size(), "; global batch ", t.batch_size * accum * grid_.dp_size(),
              " sequences = micro-batch ", t.batch_size, " x accumulation ", accum, " x dp ",
              grid_.dp_size(), "; ", static_cast<int64_t>(rs.tokens_per_step), " tokens per step; precision ",
              cfg_.precision.mode, "; ", train_->steps_per_epoch(), " micro-batches per epoch");
    if (optimizer_->sharded())
      log::info("distributed optimizer: each of the ", grid_.dp_size(), " DP ranks keeps AdamW's state for 1/",
                grid_.dp_size(), " of the parameters (", format_printf("%.1f", optimizer_->state_bytes() / 1048576.0),
                " MiB on rank 0; parallel.distributed_optimizer = false all-reduces instead)");
    fs::create_directories(t.output_dir);
  }
  if (val_ && step_ == 0) {  // the untrained model's validation loss: the curve's start
    double vl = evaluate();
    result.val_losses.push_back({0, vl});
    if (rs.root) log::info("step 0 | val_loss ", format_printf("%.4f", vl), " | val_ppl ", format_printf("%.6g", std::exp(vl)));
    write_metrics("{\"step\": 0, \"val_loss\": " + json_number(vl) + ", \"val_ppl\": " + json_number(std::exp(vl)) + "}");
  }
}

double Trainer::peak_flops(bool root) {
  double peak = cfg_.train.peak_tflops * 1e12 * grid_.world_size();
  if (peak <= 0 && device_.is_cuda()) {
    const std::string gpu = World::gpu_name(device_.index());
    const double per_gpu = known_gpu_peak_tflops(gpu, cfg_.precision.mode);
    peak = per_gpu * 1e12 * grid_.world_size();
    if (root && per_gpu > 0)
      log::info("MFU is quoted against the dense ", cfg_.precision.mode, " peak of ", gpu, ": ",
                format_printf("%.1f", per_gpu), " TFLOP/s per GPU (set train.peak_tflops to override)");
    else if (root)
      log::info("MFU unknown: no peak for GPU '", gpu, "' in ", cfg_.precision.mode, " (set train.peak_tflops)");
  }
  if (peak <= 0 && device_.is_cpu() && opts_.print_progress) {
    // Measured on every rank at once (they share the host as during training), summed. The RNG
    // draws of the probe use a private generator state: training is not perturbed.
    at::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
    const at::ScalarType dt = cpu_matmul_dtype(cfg_.precision.mode);
    at::Tensor m = at::full({1}, measure_matmul_flops(dt), at::kDouble);
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    gen.set_state(rng);
    all_reduce_host(grid_.world.get(), m, ReduceOp::kSum, device_);
    peak = m.item<double>();
    if (root)
      log::info("MFU is quoted against the measured ", dt == at::kFloat ? "fp32" : "bf16", " matmul rate: ",
                format_printf("%.1f", peak / 1e9), " GFLOP/s over ",
                grid_.world_size(), " rank(s) (set train.peak_tflops to use a device peak)");
  }
  return peak;
}

bool Trainer::stop_requested(const RunState& rs) {
  // 2: a signal on this rank, 1: the testing stop; MAX gives every rank the same reason.
  const int local = stop_signal_received() ? 2
                    : (opts_.stop_after_steps >= 0 && rs.steps_this_run >= opts_.stop_after_steps) ? 1
                                                                                                   : 0;
  at::Tensor flag = at::full({1}, local, at::kInt);
  all_reduce_host(grid_.world.get(), flag, ReduceOp::kMax, device_);
  const int agreed = flag.item<int>();
  if (agreed != 0 && rs.root)
    log::info("stop requested (", agreed == 2 ? "signal" : "stop_after_steps", "): writing a checkpoint at step ", step_);
  return agreed != 0;
}

StepRecord Trainer::train_step(TrainResult& result, RunState& rs) {
  if (opts_.before_step) opts_.before_step(rs.steps_this_run);
  const auto step_t0 = std::chrono::steady_clock::now();
  const int64_t accum = cfg_.train.gradient_accumulation_steps;
  const double scale = scaler_->scale();
  const double loss_sum = forward_backward(scale);
  const double waited = reducer_->finish();
  rs.interval.comm_wait += waited;
  result.comm_wait_seconds += waited;
  const bool found_nonfinite = unscale_and_find_nonfinite(scale);
  const bool skip = scaler_->update(found_nonfinite, grid_.world.get(), device_);
  at::Tensor loss_t = at::full({1}, loss_sum / static_cast<double>(accum), at::kDouble);
  all_reduce_host(grid_.dp.get(), loss_t, ReduceOp::kAvg, device_);
  StepRecord rec;
  rec.step = step_ + 1;
  rec.loss = loss_t.item<double>();
  rec.lr = learning_rate_at(cfg_.train, step_, total_steps_);
  rec.loss_scale = scale;
  rec.skipped = skip;
  rs.consecutive_skips = skip ? rs.consecutive_skips + 1 : 0;
  stop_if_diverged(rec, skip, rs.consecutive_skips);
  if (skip) {
    rec.grad_norm = std::numeric_limits<double>::quiet_NaN();
    if (rs.root)
      log::warn("step ", rec.step, ": non-finite gradient on some rank, step skipped (", rs.consecutive_skips,
                " in a row, at most train.max_skipped_steps = ", cfg_.train.max_skipped_steps, "); loss scale ",
                scale, " -> ", scaler_->scale());
  } else {
    clip_and_apply(rec);
    const double gathered = gather_params();  // distributed optimizer: every rank's updated shard
    rs.interval.comm_wait += gathered;
    result.comm_wait_seconds += gathered;
  }
  const double step_dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_t0).count();
  result.step_seconds += step_dt;
  result.step_times.push_back(step_dt);
  result.step_starts.push_back(std::chrono::duration<double>(step_t0.time_since_epoch()).count());
  ++step_;
  ++rs.steps_this_run;
  ++rs.interval.steps;
  rs.interval.loss_sum += rec.loss;
  return rec;
}

double Trainer::forward_backward(double scale) {
  for (auto& p : params_) p.param.mutable_grad() = at::Tensor();
  const int64_t accum = cfg_.train.gradient_accumulation_steps;
  // Summed on the device: one host sync per step, not one per micro-step (GPU queues stay full).
  at::Tensor loss_sum = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device_));
  ClearAutocastCacheAtExit clear_casts;  // before the optimizer changes the weights
  for (int64_t micro = 0; micro < accum; ++micro) {
    data::Batch b = train_->next_batch();
    reducer_->set_sync(micro == accum - 1);
    at::Tensor loss;
    {
      AutocastScope ac(cfg_.precision.mode, device_);
      at::Tensor logits = model_->forward(b.input.to(device_));
      // The logits as they are (bf16 under autocast): every cross-entropy path computes in fp32.
      loss = model_->loss(logits, b.target.to(device_));
    }
    (loss * (scale / static_cast<double>(accum))).backward();
    loss_sum.add_(loss.detach().to(at::kDouble));
  }
  return loss_sum.item<double>();
}

bool Trainer::unscale_and_find_nonfinite(double scale) {
  at::NoGradGuard no_grad;
  // The gradients this rank reads: its DP-averaged shard pieces (distributed optimizer), else
  // every parameter's .grad; each with whether its parameter is TP-sharded.
  std::vector<std::pair<at::Tensor, bool>> grads;
  if (reducer_->sharded()) {
    for (const auto& seg : reducer_->shard_segments()) grads.emplace_back(seg.grad_part, params_[seg.param].tp_sharded());
  } else {
    for (auto& p : params_)
      if (p.param.grad().defined()) grads.emplace_back(p.param.grad(), p.tp_sharded());
  }
  if (opts_.inject_inf_rank == grid_.rank() && (opts_.inject_inf_step == step_ + 1 || opts_.inject_inf_step == -2) &&
      !grads.empty())
    grads[0].first.view({-1})[0] = std::numeric_limits<float>::infinity();
  // One pass per gradient: its sum of squares is the gradient norm's part and is finite exactly
  // when every element is (it was an isfinite pass here and a double copy in the norm).
  grad_sq_sharded_ = grad_sq_replicated_ = 0;
  if (!device_.is_cpu()) {
    // On a GPU: multi-tensor kernels (the unscale, one fp32 norm per gradient) for all the
    // gradients at once, and one copy to the host.
    std::vector<at::Tensor> groups[2];  // TP-sharded, replicated
    for (auto& [g, tp_sharded] : grads) groups[tp_sharded ? 0 : 1].push_back(g);
    at::Tensor sums[2];
    for (int i = 0; i < 2; ++i) {
      if (groups[i].empty()) {
        sums[i] = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device_));
        continue;
      }
      if (scale != 1.0) at::_foreach_mul_(groups[i], 1.0 / scale);
      sums[i] = at::stack(at::_foreach_norm(groups[i], 2)).to(at::kDouble).pow(2).sum();
    }
    const at::Tensor host = at::stack({sums[0], sums[1]}).cpu();
    grad_sq_sharded_ = host[0].item<double>();
    grad_sq_replicated_ = host[1].item<double>();
    return !std::isfinite(grad_sq_sharded_ + grad_sq_replicated_);
  }
  for (auto& [g, tp_sharded] : grads) {
    if (scale != 1.0) g.mul_(1.0 / scale);
    (tp_sharded ? grad_sq_sharded_ : grad_sq_replicated_) += sum_of_squares(g);
  }
  return !std::isfinite(grad_sq_sharded_ + grad_sq_replicated_);
}

void Trainer::clip_and_apply(StepRecord& rec) {
  if (reducer_->sharded()) {  // each DP rank summed the squares of its own shard
    at::Tensor sums = at::tensor({grad_sq_sharded_, grad_sq_replicated_}, at::kDouble);
    all_reduce_host(grid_.dp.get(), sums, ReduceOp::kSum, device_);
    grad_sq_sharded_ = sums[0].item<double>();
    grad_sq_replicated_ = sums[1].item<double>();
  }
  rec.grad_norm = global_grad_norm(grad_sq_sharded_, grad_sq_replicated_, grid_.tp.get(), device_);
  const double clip = cfg_.train.grad_clip;
  // Clipping as torch.nn.utils.clip_grad_norm_, its factor applied inside AdamW's pass.
  const double c = clip > 0 && rec.grad_norm > clip ? clip / (rec.grad_norm + 1e-6) : 1.0;
  // Distributed optimizer: each bucket's updated shard is all-gathered while the next is updated.
  optimizer_->step(rec.lr, c, [this](int b) { reducer_->start_param_gather(b); });
}

double Trainer::gather_params() {
  if (!reducer_->sharded()) return 0;
  const auto t0 = std::chrono::steady_clock::now();
  reducer_->gather_params();  // waits for the gathers clip_and_apply started
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void Trainer::log_progress(const StepRecord& rec, RunState& rs) {
  const auto now = std::chrono::steady_clock::now();
  Interval& in = rs.interval;
  // Evaluation and checkpoint time inside the interval is not training time.
  const double dt = std::max(std::chrono::duration<double>(now - in.start).count() - in.excluded_seconds, 1e-9);
  const double tps = in.steps * rs.tokens_per_step / dt;
  const double mfu = rs.peak_flops > 0 ? rs.flops_per_token * tps / rs.peak_flops : std::numeric_limits<double>::quiet_NaN();
  const double elapsed = std::chrono::duration<double>(now - rs.start).count();
  const double eta = elapsed / std::max<int64_t>(1, rs.steps_this_run) * (total_steps_ - step_);
  const double mean_loss = in.loss_sum / std::max<int64_t>(1, in.steps);
  const int64_t epoch = train_->cursor().epoch;
  if (rs.root) {
    std::ostringstream os;
    os << "step " << step_ << "/" << total_steps_ << " | epoch " << epoch << " | loss " << format_printf("%.4f", mean_loss)
       << " | lr " << format_printf("%.3e", rec.lr) << " | grad norm "
       << (std::isfinite(rec.grad_norm) ? format_printf("%.3f", rec.grad_norm) : std::string("skipped")) << " | "
       << format_printf("%.0f", tps) << " tok/s | MFU " << (std::isfinite(mfu) ? format_printf("%.1f%%", 100 * mfu) : std::string("unknown"))
       << " | loss scale " << format_printf("%g", rec.loss_scale) << " | comm wait " << format_printf("%.0f%%", 100 * in.comm_wait / dt)
       << " | ETA " << format_duration(eta);
    log::info(os.str());
  }
  std::ostringstream js;
  js << "{\"step\": " << step_ << ", \"epoch\": " << epoch << ", \"loss\": " << json_number(mean_loss)
     << ", \"lr\": " << json_number(rec.lr) << ", \"grad_norm\": " << json_number(rec.grad_norm)
     << ", \"tokens_per_sec\": " << json_number(tps) << ", \"mfu\": " << json_number(mfu)
     << ", \"loss_scale\": " << json_number(rec.loss_scale) << ", \"skipped\": " << (rec.skipped ? "true" : "false")
     << ", \"comm_wait_share\": " << json_number(in.comm_wait / dt) << "}";
  write_metrics(js.str());
  in = Interval{};
  in.start = std::chrono::steady_clock::now();
}

void Trainer::evaluate_if_due(TrainResult& result, RunState& rs) {
  if (!val_ || (step_ % cfg_.train.eval_interval != 0 && step_ != total_steps_)) return;
  const auto eval_t0 = std::chrono::steady_clock::now();
  const double vl = evaluate();
  result.val_losses.push_back({step_, vl});
  const bool best = vl < best_val_;
  if (best) {
    save_best_model(vl);
    best_val_ = vl;
  }
  if (rs.root)
    log::info("step ", step_, " | val_loss ", format_printf("%.4f", vl), " | val_ppl ", format_printf("%.6g", std::exp(vl)),
              best ? " | new best, saved to " + cfg_.train.output_dir + "/best_model" : "");
  write_metrics("{\"step\": " + std::to_string(step_) + ", \"val_loss\": " + json_number(vl) +
                ", \"val_ppl\": " + json_number(std::exp(vl)) + "}");
  rs.interval.excluded_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - eval_t0).count();
}

void Trainer::checkpoint_if_due(TrainResult& result, RunState& rs) {
  if (!opts_.write_checkpoints || step_ % cfg_.checkpoint.interval != 0 || step_ >= total_steps_) return;
  const auto save_t0 = std::chrono::steady_clock::now();
  result.last_checkpoint = save_checkpoint(*this);
  if (rs.root) log::info("checkpoint written: ", result.last_checkpoint);
  rs.interval.excluded_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - save_t0).count();
}

void Trainer::end_run(TrainResult& result, const RunState& rs) {
  if (opts_.write_checkpoints && !result.stopped_by_signal && step_ >= total_steps_ && rs.steps_this_run > 0) {
    result.last_checkpoint = save_checkpoint(*this);
    if (rs.root) log::info("final checkpoint written: ", result.last_checkpoint);
  }
  result.final_step = step_;
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - rs.start).count();
  if (!result.stopped_by_signal && opts_.sample_tokens > 0) {
    try {
      result.sample = sample("The ", opts_.sample_tokens);
    } catch (const Error& e) {
      if (rs.root) log::warn("no sample: ", e.what());
    }
  }
}

}  // namespace andy
