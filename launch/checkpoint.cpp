// Checkpoint save/load (see checkpoint.h). Tensor files are LibTorch archives
// (torch::serialize::OutputArchive) whose keys are the tensor names with '.' written as '/'.
#include "launch/checkpoint.h"

#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <limits>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>

#include "core/base/durable_fs.h"
#include "core/base/logging.h"
#include "core/model/model_config.h"
#include "core/model/safetensors.h"
#include "core/model/weights_io.h"
#include "data/checksum.h"
#include "parallel/agreement.h"
#include "parallel/tp_partition.h"

namespace andy {

namespace fs = std::filesystem;
using json = nlohmann::json;

void agree_or_throw(const TrainGrid& g, const std::string& local_error, at::Device device,
                    const std::string& partial_dir) {
  agree_on_error(g.world.get(), device, local_error, [&] {
    std::error_code ec;
    if (g.rank() == 0 && !partial_dir.empty()) fs::remove_all(partial_dir, ec);
  });
}

std::string describe_write_failure(const std::string& what_kind, const std::string& path,
                                   const std::exception& e, const std::string& verb) {
  std::string what = e.what();
  if (auto* c = dynamic_cast<const c10::Error*>(&e)) what = c->what_without_backtrace();
  if (what.size() > 300) what = what.substr(0, 300) + "...";
  std::string text = what.find(path) != std::string::npos ? what_kind + ": " + what
                                                           : what_kind + ": " + verb + " " + path + ": " + what;
  if (text.find("MiB free") == std::string::npos) {
    std::string free = free_space_text(path);
    if (!free.empty()) text += " (" + free + ")";
  }
  return text;
}

std::vector<int64_t> complete_checkpoint_steps(const std::string& root) {
  std::vector<int64_t> steps;
  std::error_code ec;
  if (!fs::is_directory(root, ec)) return steps;
  for (const auto& e : fs::directory_iterator(root, ec)) {
    std::string n = e.path().filename().string();
    if (!e.is_directory() || n.rfind("step_", 0) != 0 || n.find('.') != std::string::npos) continue;
    try {
      steps.push_back(std::stoll(n.substr(5)));
    } catch (const std::exception&) {
    }
  }
  std::sort(steps.begin(), steps.end());
  return steps;
}

namespace {

// Removes complete checkpoints older than `current`, keeping the newest keep_last - 1 of them
// (with `current` that makes keep_last). Checkpoints of later steps than `current` (left by a
// run resumed from an older step) are never touched: nothing recent is deleted by an older run.
void prune_checkpoints(const std::string& root, int64_t current, int64_t keep_last) {
  std::vector<int64_t> older;
  for (int64_t s : complete_checkpoint_steps(root))
    if (s < current) older.push_back(s);
  const size_t keep_older = static_cast<size_t>(std::max<int64_t>(1, keep_last) - 1);
  for (size_t i = 0; i + keep_older < older.size(); ++i)
    fs::remove_all(root + "/" + checkpoint_dir_name(older[i]));
}


// Reads `name` from an open archive into a tensor of the expected shape.
at::Tensor read_tensor(torch::serialize::InputArchive& ar, const std::string& file,
                       const std::string& name, at::IntArrayRef expected) {
  at::Tensor t = read_archive_tensor(ar, file, name, "checkpoint file");
  ANDY_CHECK_T(IoError, expected.empty() || t.sizes() == expected, "checkpoint file ", file,
               ": '", name, "' has shape ", t.sizes(), ", the model expects ", expected,
               " (another model config?)");
  return t;
}

torch::serialize::InputArchive open_archive(const std::string& file) {
  return andy::open_archive(file, "checkpoint file");
}

// The model shapes of the checkpoint (its saved config) must be this run's: otherwise an
// IoError names every differing [model] key, before any tensor is read.
void check_same_model(const json& meta, const std::string& meta_path, const Config& cfg) {
  if (!meta.contains("config") || !meta["config"].is_string()) return;  // older format: shapes are checked per tensor
  Config saved;
  try {
    apply_toml_string(saved, meta["config"].get<std::string>(), meta_path + " (config)");
  } catch (const std::exception& e) {
    ANDY_THROW(IoError, "checkpoint file ", meta_path, ": its saved config cannot be read: ", e.what());
  }
  const ModelConfig &a = saved.model, &b = cfg.model;
  std::vector<std::string> diffs;
  auto cmp = [&](const char* key, auto x, auto y) {
    if (x != y) {
      std::ostringstream os;
      os << key << " = " << x << " there, " << y << " here";
      diffs.push_back(os.str());
    }
  };
  cmp("dim", a.dim, b.dim);
  cmp("n_layer", a.n_layer, b.n_layer);
  cmp("n_head", a.n_head, b.n_head);
  cmp("n_kv_head", a.n_kv_head, b.n_kv_head);
  cmp("ffn_dim (derived)", derived_ffn_dim(a), derived_ffn_dim(b));
  cmp("vocab_size", a.vocab_size, b.vocab_size);
  cmp("tie_embeddings", a.tie_embeddings, b.tie_embeddings);
  if (diffs.empty()) return;
  std::string list;
  for (const auto& d : diffs) list += (list.empty() ? "" : "; ") + d;
  ANDY_THROW(IoError, "checkpoint ", fs::path(meta_path).parent_path().string(),
             " holds another model: [model] ", list,
             ". Resume with the model it was trained with, or start fresh in another --output_dir "
             "(or --resume none --set checkpoint.existing=archive)");
}

}  // namespace

std::string checkpoint_dir_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%08lld", static_cast<long long>(step));
  return buf;
}

namespace {

// The optimizer's tensors per parameter, in each shard file: the weight, then AdamW's moments.
const std::vector<std::string>& optimizer_prefixes() {
  static const std::vector<std::string> p = {"", "exp_avg.", "exp_avg_sq."};
  return p;
}

// Rank 0 makes checkpoints/ and an empty step_N.tmp/; the error text, or "".
std::string create_tmp_dir(const std::string& root, const std::string& tmp_dir) {
  try {
    fs::create_directories(root);
    fs::remove_all(tmp_dir);
    fs::create_directories(tmp_dir);
  } catch (const std::exception& e) {
    return std::string("checkpoint: cannot create ") + tmp_dir + ": " + e.what();
  }
  return "";
}

// Every rank's CPU generator state, [world, state bytes], on every rank.
at::Tensor gather_rng_states(const TrainGrid& g, at::Device device) {
  at::Tensor rng = at::detail::getDefaultCPUGenerator().get_state();
  at::Tensor all = at::empty({g.world_size() * rng.numel()}, rng.options());
  if (g.world && g.world->size() > 1 && g.world->backend() == Backend::kNccl) {
    at::Tensor d = all.to(device);
    g.world->all_gather(d, rng.to(device))->wait();
    all.copy_(d.cpu());
  } else if (g.world && g.world->size() > 1) {
    g.world->all_gather(all, rng)->wait();
  } else {
    all.copy_(rng.view({-1}));
  }
  return all.view({g.world_size(), -1});
}

// The first DP replica writes its TP shard: the weights as safetensors, the moments, step count
// and loss scaler as an archive, each with a sidecar holding its checksum; the error text, or "".
std::string write_rank_shard(Trainer& tr, const std::string& tmp_dir) {
  const TrainGrid& g = tr.grid();
  const std::string file = tmp_dir + "/" + checkpoint_shard_file(g.tp_rank());
  const std::string weights_file = tmp_dir + "/" + checkpoint_weights_file(g.tp_rank());
  const TrainerOptions& opts = tr.options();
  if (opts.fail_checkpoint_rank == g.rank() && opts.fail_checkpoint_step == tr.step())
    return "checkpoint: cannot write " + file + ": injected failure (TrainerOptions::fail_checkpoint_rank)";
  if (g.dp_rank() != 0) return "";
  std::string current = weights_file;
  try {
    NamedTensors weights;
    torch::serialize::OutputArchive ar;
    for (auto& s : tr.optimizer().slots()) {
      weights.emplace_back(s.name, s.param.detach().cpu());
      ar.write(archive_key("exp_avg." + s.name), s.exp_avg.cpu());
      ar.write(archive_key("exp_avg_sq." + s.name), s.exp_avg_sq.cpu());
    }
    ar.write("optimizer_steps", at::full({1}, tr.optimizer().steps(), at::kLong));
    ar.write("loss_scaler", at::tensor({tr.scaler().scale(), static_cast<double>(tr.scaler().growth_tracker())},
                                       at::kDouble));
    // The checksums travel to rank 0 (meta.json) in sidecar files beside the shards.
    write_safetensors(weights, weights_file);
    write_file_durable(weights_file + ".checksum", data::file_checksum(weights_file) + "\n");
    current = file;
    write_file_durable(file + ".checksum", save_archive(ar, file) + "\n");
  } catch (const std::exception& e) {
    return describe_write_failure("checkpoint", current, e);
  }
  return "";
}

// Rank 0: rng.pt written, and every file's checksum (the shards' from their sidecars).
json write_rng_and_collect_checksums(const std::string& tmp_dir, const at::Tensor& all_rng, int tp_size) {
  torch::serialize::OutputArchive rar;
  rar.write("rng", all_rng);
  json checksums;
  checksums["rng.pt"] = save_archive(rar, tmp_dir + "/rng.pt");
  for (int r = 0; r < tp_size; ++r)
    for (const std::string& name : {checkpoint_weights_file(r), checkpoint_shard_file(r)}) {
      const std::string side = tmp_dir + "/" + name + ".checksum";
      std::ifstream in(side);
      std::string sum;
      in >> sum;
      ANDY_CHECK_T(IoError, !sum.empty(), "checkpoint: ", side, " is missing");
      checksums[name] = sum;
      fs::remove(side);
    }
  return checksums;
}

json checkpoint_meta(Trainer& tr, const json& checksums) {
  const TrainGrid& g = tr.grid();
  const Config& cfg = tr.config();
  const data::LoaderCursor c = tr.train_loader().cursor();
  json meta;
  meta["format_version"] = 3;  // 2: per-file checksums; 3: weights apart, in safetensors
  meta["step"] = tr.step();
  meta["optimizer_steps"] = tr.optimizer().steps();
  meta["tp_size"] = g.tp_size();
  meta["dp_size"] = g.dp_size();
  meta["world_size"] = g.world_size();
  meta["batch_size"] = cfg.train.batch_size;
  meta["gradient_accumulation_steps"] = cfg.train.gradient_accumulation_steps;
  meta["seq_len"] = cfg.data.seq_len;
  meta["data_cursor"] = {{"epoch", c.epoch},
                         {"position", c.position},
                         {"windows_consumed", c.position * tr.train_loader().global_batch()}};
  meta["best_val_loss"] = std::isfinite(tr.best_val_loss()) ? json(tr.best_val_loss()) : json(nullptr);
  meta["loss_scale"] = tr.scaler().scale();
  meta["loss_scale_growth_tracker"] = tr.scaler().growth_tracker();
  meta["files"] = json::array();
  for (int r = 0; r < g.tp_size(); ++r) {
    meta["files"].push_back(checkpoint_weights_file(r));
    meta["files"].push_back(checkpoint_shard_file(r));
  }
  meta["checksums"] = checksums;  // FNV-1a 64 per file, verified before a resume
  meta["config"] = config_to_toml(cfg);
  return meta;
}

// Rank 0, once every rank has written: step_N.tmp/ becomes step_N/, `latest` names it, older
// checkpoints beyond keep_last go. A complete checkpoint of the same step (a stop right after
// a periodic save) is moved aside first and removed only once the new one is in place and
// recorded.
void publish_checkpoint(const std::string& tmp_dir, const std::string& final_dir, const std::string& root,
                        int64_t step, int64_t keep_last) {
  fsync_path(tmp_dir);
  const std::string old_dir = final_dir + ".old";
  fs::remove_all(old_dir);
  if (fs::exists(final_dir)) fs::rename(final_dir, old_dir);
  fs::rename(tmp_dir, final_dir);
  fsync_path(root);
  write_file_durable(root + "/latest", checkpoint_dir_name(step) + "\n");
  fs::remove_all(old_dir);
  prune_checkpoints(root, step, keep_last);
}

}  // namespace

std::string save_checkpoint(Trainer& tr) {
  const TrainGrid& g = tr.grid();
  const Config& cfg = tr.config();
  const std::string root = cfg.train.output_dir + "/checkpoints";
  const std::string final_dir = root + "/" + checkpoint_dir_name(tr.step());
  const std::string tmp_dir = final_dir + ".tmp";
  agree_or_throw(g, g.rank() == 0 ? create_tmp_dir(root, tmp_dir) : "", tr.device());
  const at::Tensor all_rng = gather_rng_states(g, tr.device());
  // A distributed optimizer's moments, gathered into DP rank 0 for the file (the format is the
  // same either way) and freed again after it.
  tr.optimizer().gather_full_state();
  std::string shard_err = write_rank_shard(tr, tmp_dir);
  tr.optimizer().release_full_state();
  agree_or_throw(g, shard_err, tr.device(), tmp_dir);
  std::string err;
  if (g.rank() == 0) {
    try {
      const json checksums = write_rng_and_collect_checksums(tmp_dir, all_rng, g.tp_size());
      write_file_durable(tmp_dir + "/meta.json", checkpoint_meta(tr, checksums).dump(2));
      publish_checkpoint(tmp_dir, final_dir, root, tr.step(), cfg.checkpoint.keep_last);
    } catch (const std::exception& e) {
      err = describe_write_failure("checkpoint", final_dir, e, "cannot finish");
      std::error_code ec;  // put a moved-aside complete checkpoint back
      if (!fs::exists(final_dir) && fs::exists(final_dir + ".old")) fs::rename(final_dir + ".old", final_dir, ec);
    }
  }
  agree_or_throw(g, err, tr.device(), tmp_dir);
  return final_dir;
}

std::string earlier_run_contents(const Config& cfg) {
  const std::string out = cfg.train.output_dir;
  std::vector<int64_t> steps = complete_checkpoint_steps(out + "/checkpoints");
  std::string what;
  if (!steps.empty()) {
    what = std::to_string(steps.size()) + " checkpoint(s) " + checkpoint_dir_name(steps.front());
    if (steps.size() > 1) what += " .. " + checkpoint_dir_name(steps.back());
    what += fs::exists(out + "/checkpoints/latest") ? "" : " (no 'latest' file)";
  }
  if (fs::exists(out + "/best_model")) {
    double v = best_model_val_loss(out);
    what += std::string(what.empty() ? "" : " and ") + "best_model/" +
            (std::isfinite(v) ? " (val_loss " + std::to_string(v) + ")" : "");
  }
  return what;
}

void check_fresh_start(const Config& cfg, const std::string& resume_dir) {
  if (!resume_dir.empty() || cfg.checkpoint.existing != "refuse") return;
  std::string what = earlier_run_contents(cfg);
  if (what.empty()) return;
  const std::string why = cfg.checkpoint.resume == "auto"
                              ? "checkpoints/latest is missing, so nothing would be resumed"
                              : "--resume " + cfg.checkpoint.resume + " starts a fresh run";
  throw ConfigError("[train] output_dir = " + cfg.train.output_dir + " already holds an earlier run: " +
                    what + "; " + why + " whose checkpoints would be mixed with (and pruned among) "
                    "the old ones. To continue the old run: --resume PATH (a step directory); to "
                    "start fresh: another --output_dir, or --set checkpoint.existing=archive (moves "
                    "them to " + cfg.train.output_dir + "/archive/) or =replace (deletes them)");
}

std::string clear_earlier_run(const Config& cfg, const std::string& resume_dir) {
  if (!resume_dir.empty() || cfg.checkpoint.existing == "refuse") return "";
  if (earlier_run_contents(cfg).empty()) return "";
  const std::string out = cfg.train.output_dir;
  const std::vector<std::string> names = {"checkpoints", "best_model", "metrics.jsonl"};
  if (cfg.checkpoint.existing == "replace") {
    for (const auto& n : names) fs::remove_all(out + "/" + n);
    return "removed the earlier run's checkpoints/, best_model/ and metrics.jsonl from " + out +
           " (checkpoint.existing = replace)";
  }
  char stamp[32];
  std::time_t now = std::time(nullptr);
  std::strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", std::localtime(&now));
  std::string dest = out + "/archive/run_" + stamp;
  for (int i = 1; fs::exists(dest); ++i) dest = out + "/archive/run_" + stamp + "_" + std::to_string(i);
  fs::create_directories(dest);
  for (const auto& n : names)
    if (fs::exists(out + "/" + n)) fs::rename(out + "/" + n, dest + "/" + n);
  fsync_path(out);
  return "moved the earlier run's checkpoints/, best_model/ and metrics.jsonl to " + dest +
         " (checkpoint.existing = archive)";
}

bool lock_output_dir(const Config& cfg, bool create) {
  static int held_fd = -1;  // held for the process's life; the OS drops it when the process dies
  static std::string held_dir;
  const std::string dir = cfg.train.output_dir;
  if (held_fd >= 0 && held_dir == dir) return true;
  if (!fs::is_directory(dir)) {
    if (!create) return false;
    fs::create_directories(dir);
  }
  const std::string path = dir + "/.lock";
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  ANDY_CHECK_T(IoError, fd >= 0, "[train] output_dir = ", dir, ": cannot open ", path, ": ", std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    char buf[256] = {0};
    ssize_t n = ::pread(fd, buf, sizeof buf - 1, 0);
    ::close(fd);
    std::string holder = n > 0 ? std::string(buf, static_cast<size_t>(n)) : std::string("unknown");
    while (!holder.empty() && (holder.back() == '\n' || holder.back() == ' ')) holder.pop_back();
    throw ConfigError("[train] output_dir = " + dir + " is in use by another run (" + holder +
                      "); two runs in one directory would overwrite each other's checkpoints and "
                      "metrics: wait for it to end, or use another --output_dir");
  }
  char host[256] = {0};
  ::gethostname(host, sizeof host - 1);
  std::time_t now = std::time(nullptr);
  char when[64];
  std::strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", std::localtime(&now));
  const std::string text = std::string("host ") + host + ", pid " + std::to_string(::getpid()) + ", started " + when + "\n";
  if (::ftruncate(fd, 0) == 0 && ::pwrite(fd, text.data(), text.size(), 0) < 0) {
    // The lock holds without the description; nothing else to do.
  }
  held_fd = fd;
  held_dir = dir;
  return true;
}

double best_model_val_loss(const std::string& output_dir) {
  const std::string dir = output_dir + "/best_model";
  try {
    std::ifstream f(dir + "/meta.json");
    if (f) {
      json meta = json::parse(f);
      if (meta.contains("val_loss") && meta["val_loss"].is_number()) return meta["val_loss"].get<double>();
    }
    // Older best_model directories: "... (val_loss X)" in README.txt.
    std::ifstream r(dir + "/README.txt");
    std::string text((std::istreambuf_iterator<char>(r)), std::istreambuf_iterator<char>());
    auto at = text.find("(val_loss ");
    if (at != std::string::npos) return std::stod(text.substr(at + 10));
  } catch (const std::exception&) {
  }
  return std::numeric_limits<double>::quiet_NaN();
}

void check_resume_checkpoint(const Config& cfg, const std::string& dir, int tp_rank, int tp_size) {
  // Bad input (exit 2): the user's checkpoint does not fit this run or is damaged.
  const std::string meta_path = dir + "/meta.json";
  json meta;
  try {
    std::ifstream f(meta_path);
    ANDY_USER_CHECK(f.good(), "checkpoint file ", meta_path, " is missing (partial checkpoint)");
    meta = json::parse(f);
  } catch (const ConfigError&) {
    throw;
  } catch (const std::exception& e) {
    throw ConfigError("checkpoint file " + meta_path + " is damaged: " + e.what());
  }
  try {
    check_same_model(meta, meta_path, cfg);
  } catch (const Error& e) {
    throw ConfigError(e.what());
  }
  const int saved_tp = meta.value("tp_size", 0);
  ANDY_USER_CHECK(saved_tp >= 1, "checkpoint file ", meta_path, " has no valid tp_size");
  // The files this rank will read: its own shard at the same TP size, every shard otherwise.
  const bool weights_apart = meta.value("format_version", 1) >= 3;
  std::vector<std::string> files;
  for (int r = 0; r < saved_tp; ++r) {
    if (saved_tp == tp_size && r != tp_rank) continue;
    if (weights_apart) files.push_back(checkpoint_weights_file(r));
    files.push_back(checkpoint_shard_file(r));
  }
  if (tp_rank == 0) files.push_back("rng.pt");
  const json sums = meta.value("checksums", json::object());
  for (const std::string& name : files) {
    const std::string path = dir + "/" + name;
    ANDY_USER_CHECK(fs::exists(path), "checkpoint file ", path, " is missing (partial or damaged checkpoint)");
    if (!sums.contains(name)) continue;  // written before per-file checksums
    const std::string got = data::file_checksum(path);
    ANDY_USER_CHECK(got == sums[name].get<std::string>(), "checkpoint file ", path, " is damaged: checksum ", got,
                    " differs from ", sums[name].get<std::string>(), " recorded in ", meta_path,
                    "; resume from an older checkpoint (--resume PATH)");
  }
}

std::string resolve_resume_path(const Config& cfg) {
  const std::string& r = cfg.checkpoint.resume;
  if (r == "none" || r.empty()) return "";
  if (r == "auto") {
    std::string latest = cfg.train.output_dir + "/checkpoints/latest";
    if (!fs::exists(latest)) return "";
    std::ifstream f(latest);
    std::string name;
    f >> name;
    std::string dir = cfg.train.output_dir + "/checkpoints/" + name;
    ANDY_CHECK_T(IoError, !name.empty() && fs::exists(dir + "/meta.json"), "checkpoint: ", latest,
                 " names '", name, "', which is not a complete checkpoint (", dir,
                 "/meta.json missing); pass --resume PATH or --resume none");
    return dir;
  }
  if (!fs::is_directory(r))  // user input: named as given, no source location
    throw ConfigError("--resume " + r +
                      ": not a directory; expected auto, none or a checkpoint step directory");
  return r;
}

namespace {

// The optimizer state of this rank's shard, as read from a checkpoint.
struct ShardState {
  StateDict tensors;  // "<prefix><param name>" for each optimizer prefix
  int64_t optimizer_steps = 0;
  double loss_scale = 1.0;
  int64_t growth_tracker = 0;
};

json read_meta_for_load(const std::string& dir) {
  const std::string meta_path = dir + "/meta.json";
  ANDY_CHECK_T(IoError, fs::exists(meta_path), "checkpoint file ", meta_path, " is missing (partial checkpoint)");
  try {
    std::ifstream f(meta_path);
    return json::parse(f);
  } catch (const std::exception& e) {
    ANDY_THROW(IoError, "checkpoint file ", meta_path, " is damaged: ", e.what());
  }
}

// One TP rank's files: its weights (read_checkpoint_weights: model_tpRR.safetensors, or the shard
// archive of format 2 and older, which is then opened twice), every AdamW moment of `slots`
// (shapes checked when `check_shapes`), and the step count and loss scaler into `scalars`.
void read_shard_file(const std::string& dir, int r, const std::vector<AdamW::Slot>& slots, bool check_shapes,
                     StateDict& tensors, ShardState* scalars) {
  std::map<std::string, std::vector<int64_t>> weights;
  for (const auto& s : slots) weights[s.name] = check_shapes ? s.param.sizes().vec() : std::vector<int64_t>{};
  tensors = read_checkpoint_weights(dir, r, weights);
  const std::string file = dir + "/" + checkpoint_shard_file(r);
  auto ar = open_archive(file);
  for (const auto& s : slots)
    for (const std::string& pre : optimizer_prefixes())
      if (!pre.empty())
        tensors[pre + s.name] = read_tensor(ar, file, pre + s.name, check_shapes ? s.param.sizes() : at::IntArrayRef{});
  if (!scalars) return;
  scalars->optimizer_steps = read_tensor(ar, file, "optimizer_steps", {1}).item<int64_t>();
  const at::Tensor sc = read_tensor(ar, file, "loss_scaler", {2});
  scalars->loss_scale = sc[0].item<double>();
  scalars->growth_tracker = static_cast<int64_t>(sc[1].item<double>());
}

// Written at another TP size: merge the old shards, split for this one.
ShardState read_resharded(Trainer& tr, const std::string& dir, int old_tp) {
  const TrainGrid& g = tr.grid();
  const auto& slots = tr.optimizer().slots();
  ShardState st;
  std::vector<StateDict> shards(old_tp);
  for (int r = 0; r < old_tp; ++r)
    read_shard_file(dir, r, slots, false, shards[r], r == 0 ? &st : nullptr);
  const PartitionSpecs old_specs = llama_partition_specs(tr.config().model, old_tp);
  const PartitionSpecs new_specs = llama_partition_specs(tr.config().model, g.tp_size());
  PartitionSpecs old_all, new_all;
  for (const auto& s : slots)
    for (const std::string& pre : optimizer_prefixes()) {
      old_all[pre + s.name] = old_specs.at(s.name);
      new_all[pre + s.name] = new_specs.at(s.name);
    }
  StateDict full;
  try {
    full = merge_state_dicts(shards, old_all);
  } catch (const Error& e) {
    ANDY_THROW(IoError, "checkpoint ", dir, ": cannot merge its ", old_tp,
               " TP shards for resharding to tensor_parallel_size ", g.tp_size(), ": ", e.what());
  }
  st.tensors = split_state_dict(full, new_all, g.tp_rank(), g.tp_size());
  for (const auto& s : slots)
    for (const std::string& pre : optimizer_prefixes()) {
      const at::Tensor& t = st.tensors.at(pre + s.name);
      ANDY_CHECK_T(IoError, t.sizes() == s.param.sizes(), "checkpoint ", dir, ": '", pre + s.name,
                   "' resharded to ", t.sizes(), ", the model expects ", s.param.sizes());
    }
  if (g.rank() == 0) log::info("checkpoint ", dir, ": resharded from tensor_parallel_size ", old_tp, " to ", g.tp_size());
  return st;
}

void apply_shard_state(Trainer& tr, const ShardState& st) {
  at::NoGradGuard no_grad;
  for (auto& s : tr.optimizer().slots()) {
    at::Tensor* targets[] = {&s.param, &s.exp_avg, &s.exp_avg_sq};
    for (size_t i = 0; i < optimizer_prefixes().size(); ++i) {
      const at::Tensor& loaded = st.tensors.at(optimizer_prefixes()[i] + s.name);
      if (targets[i]->defined()) targets[i]->copy_(loaded);
      else *targets[i] = loaded;  // a distributed optimizer's moments (AdamW::scatter_full_state)
    }
  }
  tr.optimizer().set_steps(st.optimizer_steps);
  tr.scaler().set_state(st.loss_scale, st.growth_tracker);
}

// The generator state of this rank, when the world has the size it was saved with.
void restore_rng(Trainer& tr, const std::string& dir, const json& meta) {
  if (meta.at("world_size").get<int>() != tr.grid().world_size()) return;
  const std::string file = dir + "/rng.pt";
  auto ar = open_archive(file);
  const at::Tensor all = read_tensor(ar, file, "rng", {});
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  gen.set_state(all[tr.grid().rank()].contiguous());
}

// Windows consumed in the epoch, re-expressed in global batches of this layout.
void restore_data_cursor(Trainer& tr, const std::string& dir, const json& meta) {
  const auto& c = meta.at("data_cursor");
  const int64_t epoch = c.at("epoch").get<int64_t>();
  const int64_t consumed = c.at("windows_consumed").get<int64_t>();
  const int64_t gb = tr.train_loader().global_batch();
  int64_t pos = consumed / gb;
  if (consumed % gb != 0 && tr.grid().rank() == 0)
    log::warn("checkpoint ", dir, ": ", consumed, " windows of epoch ", epoch,
              " were consumed, not a multiple of the new global batch ", gb, "; resuming at ", pos * gb, " (",
              consumed - pos * gb, " windows are served again)");
  pos = std::min(pos, tr.train_loader().steps_per_epoch());
  tr.train_loader().seek({epoch, pos});
}

// Reads this rank's part of checkpoint `dir` into the trainer; no collectives.
void load_checkpoint_local(Trainer& tr, const std::string& dir) {
  const TrainGrid& g = tr.grid();
  const Config& cfg = tr.config();
  const json meta = read_meta_for_load(dir);
  check_same_model(meta, dir + "/meta.json", cfg);
  if (g.rank() == 0 && meta.contains("seq_len") && meta["seq_len"].get<int64_t>() != cfg.data.seq_len)
    log::warn("checkpoint ", dir, " was trained with data.seq_len = ", meta["seq_len"].get<int64_t>(), ", this run uses ",
              cfg.data.seq_len, ": the data cursor counts windows, so the resumed data order shifts");
  const int old_tp = meta.at("tp_size").get<int>();
  ShardState st;
  if (old_tp == g.tp_size())
    read_shard_file(dir, g.tp_rank(), tr.optimizer().slots(), true, st.tensors, &st);
  else
    st = read_resharded(tr, dir, old_tp);
  apply_shard_state(tr, st);
  tr.set_step(meta.at("step").get<int64_t>());
  if (!meta["best_val_loss"].is_null()) tr.set_best_val_loss(meta["best_val_loss"].get<double>());
  restore_rng(tr, dir, meta);
  restore_data_cursor(tr, dir, meta);
}

}  // namespace

void load_checkpoint(Trainer& tr, const std::string& dir) {
  // A damaged shard may be read by some ranks only: every rank agrees before training starts.
  std::string err;
  try {
    load_checkpoint_local(tr, dir);
    tr.optimizer().scatter_full_state();  // a distributed optimizer keeps its pieces of the moments
  } catch (const std::exception& e) {
    tr.optimizer().release_full_state();
    err = e.what();
    if (err.find("checkpoint") == std::string::npos) err = "checkpoint " + dir + ": " + err;
  }
  agree_or_throw(tr.grid(), err, tr.device());
}

}  // namespace andy
