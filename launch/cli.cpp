// Flag parsing, help text and config loading for the subcommands.
#include "launch/cli.h"

#include <filesystem>
#include <dlfcn.h>
#include <torch/torch.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <thread>

#include "core/base/cpu.h"
#include "core/base/error.h"
#include "core/base/logging.h"
#include "core/base/torch_compat.h"
#include "parallel/world.h"

namespace andy {

namespace {
std::string normalize(std::string s) {
  std::replace(s.begin(), s.end(), '-', '_');
  return s;
}

// The Python workflow's flag names and the keys they set.
const std::vector<std::pair<std::string, std::string>>& named_config_flags() {
  static const std::vector<std::pair<std::string, std::string>> m = {
      {"train_file", "data.train_file"},
      {"val_file", "data.val_file"},
      {"tokenizer_path", "data.tokenizer_path"},
      {"output_dir", "train.output_dir"},
      {"device", "train.device"},
      {"batch_size", "train.batch_size"},
      {"learning_rate", "train.learning_rate"},
      {"num_epochs", "train.num_epochs"},
      {"gradient_accumulation_steps", "train.gradient_accumulation_steps"},
  };
  return m;
}
}  // namespace

std::string ParsedArgs::get_any(std::initializer_list<const char*> names) const {
  std::string value;
  for (const auto& [flag, v] : ordered_)
    for (const char* n : names)
      if (flag == n) value = v;
  return value;
}

bool ParsedArgs::has(const std::string& name) const {
  for (const auto& [k, v] : ordered_)
    if (k == name) return true;
  return false;
}

std::string ParsedArgs::get(const std::string& name, const std::string& fallback) const {
  std::string out = fallback;
  for (const auto& [k, v] : ordered_)
    if (k == name) out = v;
  return out;
}

double ParsedArgs::get_double(const std::string& name, double fallback) const {
  if (!has(name)) return fallback;
  std::string v = get(name);
  char* end = nullptr;
  double x = std::strtod(v.c_str(), &end);
  if (v.empty() || *end) throw ConfigError("--" + name + " " + v + ": expected a number");
  return x;
}

int64_t ParsedArgs::get_int(const std::string& name, int64_t fallback) const {
  if (!has(name)) return fallback;
  std::string v = get(name);
  char* end = nullptr;
  long long x = std::strtoll(v.c_str(), &end, 10);
  if (v.empty() || *end) throw ConfigError("--" + name + " " + v + ": expected an integer");
  return x;
}

ParsedArgs parse_flags(const std::string& command, const std::vector<Flag>& flags, int argc,
                       char** argv, int start) {
  ParsedArgs out;
  for (int i = start; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--", 0) != 0 || a.size() == 2) {
      out.append_positional(a);
      continue;
    }
    std::string body = a.substr(2), value;
    bool has_value = false;
    size_t eq = body.find('=');
    if (eq != std::string::npos) {
      value = body.substr(eq + 1);
      body = body.substr(0, eq);
      has_value = true;
    }
    std::string name = normalize(body);
    if (name == "help") {
      out.append("help", "true");
      continue;
    }
    const Flag* spec = nullptr;
    for (const auto& f : flags)
      if (normalize(f.name) == name) spec = &f;
    if (!spec) {
      std::vector<std::string> names;
      for (const auto& f : flags) names.push_back(normalize(f.name));
      std::string hint = did_you_mean(name, names);
      throw ConfigError("andyllm " + command + ": unknown flag --" + body +
                        (hint.empty() ? "" : " (did you mean --" + hint + "?)") +
                        "; see 'andyllm " + command + " --help'");
    }
    if (spec->metavar.empty()) {
      if (has_value && value != "true" && value != "false") {
        throw ConfigError("andyllm " + command + ": --" + spec->name + " takes no value");
      }
      out.append(spec->name, has_value ? value : "true");
      continue;
    }
    if (!has_value) {
      if (i + 1 >= argc) {
        throw ConfigError("andyllm " + command + ": --" + spec->name + " expects a value (" +
                          spec->metavar + ")");
      }
      value = argv[++i];
    }
    out.append(spec->name, value);
  }
  return out;
}

std::string format_flags_help(const std::vector<Flag>& flags) {
  std::string out;
  for (const auto& f : flags) {
    std::string left = "  --" + f.name + (f.metavar.empty() ? "" : " " + f.metavar);
    if (left.size() < 34) left += std::string(34 - left.size(), ' ');
    else left += "\n" + std::string(34, ' ');
    out += left + f.help + (f.repeatable ? " (repeatable)" : "") + "\n";
  }
  out += "  --help                          this text\n";
  return out;
}

std::vector<Flag> config_flags() {
  return {
      {"config", "FILE", "TOML run config (see configs/); defaults apply without it"},
      {"set", "SECTION.KEY=VALUE", "override one config key, e.g. --set parallel.tensor_parallel_size=2", true},
      {"train_file", "PATH", "training shards (sets data.train_file)"},
      {"val_file", "PATH", "validation shards (sets data.val_file)"},
      {"tokenizer_path", "PATH", "sentencepiece model (sets data.tokenizer_path)"},
      {"output_dir", "DIR", "run output directory (sets train.output_dir)"},
      {"device", "cpu|cuda", "device (sets train.device)"},
      {"batch_size", "N", "micro-batch per data-parallel rank (sets train.batch_size)"},
      {"learning_rate", "LR", "peak learning rate (sets train.learning_rate)"},
      {"num_epochs", "N", "epochs (sets train.num_epochs)"},
      {"gradient_accumulation_steps", "N", "micro-batches per step (sets train.gradient_accumulation_steps)"},
      {"fp16", "", "fp16 mixed precision with loss scaling (sets precision.mode=fp16)"},
      {"print_config", "", "print the effective config (and model size) and exit"},
      {"help_config", "", "print every config key with type, default, range and description"},
  };
}

Config load_config(const ParsedArgs& args) {
  Config cfg;
  std::vector<std::string> configs;
  for (const auto& [flag, value] : args.ordered())
    if (flag == "config") configs.push_back(value);
  if (configs.size() > 1)
    throw ConfigError("--config given " + std::to_string(configs.size()) + " times (" + configs[0] + ", then " +
                      configs[1] + "): a run has one config file; override single keys with --set section.key=value");
  if (!configs.empty()) {
    if (std::filesystem::is_directory(configs[0]))
      throw ConfigError("--config " + configs[0] + ": is a directory; expected a TOML file such as configs/tiny.toml");
    apply_toml_file(cfg, configs[0]);
  }
  for (const auto& [flag, value] : args.ordered()) {
    if (flag == "set") {
      apply_set(cfg, value);
    } else if (flag == "fp16") {
      if (value == "true") apply_value_text(cfg, "precision.mode", "fp16", "--fp16");
    } else {
      for (const auto& [name, key] : named_config_flags()) {
        if (flag == name) apply_value_text(cfg, key, value, "--" + name);
      }
    }
  }
  return cfg;
}

void reject_positional(const ParsedArgs& args, const std::string& command, size_t allowed) {
  if (args.positional().size() <= allowed) return;
  const std::string& extra = args.positional()[allowed];
  std::string hint;
  if (extra.size() > 5 && extra.compare(extra.size() - 5, 5, ".toml") == 0) hint = " (did you mean --config " + extra + "?)";
  throw ConfigError("andyllm " + command + ": unexpected argument '" + extra + "'" + hint +
                    "; see 'andyllm " + command + " --help'");
}

bool handle_config_info_flags(const ParsedArgs& args, const Config& cfg,
                              const std::string& extra_info) {
  if (args.has("help_config")) {
    if (current_rank() <= 0) std::printf("%s", config_schema_help().c_str());
    return true;
  }
  if (args.has("print_config")) {
    if (current_rank() <= 0) std::printf("%s%s", config_to_toml(cfg).c_str(), extra_info.c_str());
    return true;
  }
  return false;
}

void check_device_available(const Config& cfg, const World* world) {
  if (cfg.train.device != "cuda") return;
  const std::string at = "[train] device = \"cuda\" (" + cfg.origin_of("train.device") + ")";
  if (!at::hasCUDA())
    throw ConfigError(at + ": no GPU is visible to this LibTorch (" +
                      (compat::torch_has_cuda() ? "built with CUDA, but no device was found"
                                                : "a CPU-only build") +
                      "); use --device cpu, or run on a GPU node with a CUDA-enabled LibTorch");
  const int gpus = compat::cuda_device_count();
  const int local = world ? world->local_size() : 1;
  if (local > gpus)
    throw ConfigError(at + ": " + std::to_string(local) + " ranks run on host " +
                      (world ? world->hostname() : std::string("this host")) + " but only " +
                      std::to_string(gpus) + " GPU(s) are visible; each rank needs its own GPU: "
                      "start at most " + std::to_string(gpus) + " ranks per host");
}

Config load_config_collectively(const ParsedArgs& args, World* world) {
  Config cfg;
  auto load = [&] {
    cfg = load_config(args);
    // --print-config / --help-config describe a run without launching it: no world-size check.
    bool describe_only = args.has("print_config") || args.has("help_config");
    validate_config(cfg, world && !describe_only ? world->size() : 0);
    if (!describe_only) check_device_available(cfg, world);
  };
  run_agreed(world ? world->comm().get() : MPI_COMM_NULL, load);
  return cfg;
}

GridOptions grid_options_from(const Config& cfg, const std::string& device, const std::string& device_key,
                              int tp_size, World* world) {
  GridOptions g;
  g.tensor_parallel_size = tp_size;
  const bool cuda = device == "cuda";
  const std::string& backend = cfg.parallel.backend;
  ANDY_USER_CHECK(!(cuda && backend == "mpi"), "[parallel] backend = \"mpi\" (", cfg.origin_of("parallel.backend"),
                  ") takes CPU tensors, but ", device_key, " = \"cuda\": use backend = \"nccl\" or \"auto\"");
  g.backend = backend == "nccl" || (backend == "auto" && cuda) ? Backend::kNccl : Backend::kMpi;
  if (cuda) g.device = world->device_for_local_rank(compat::cuda_device_count());
  g.timeout = std::chrono::milliseconds(static_cast<int64_t>(cfg.parallel.collective_timeout_s * 1000));
  return g;
}

namespace {

void warn_if_blas_pool_contends(int threads, bool speaks) {
  // OpenBLAS built on pthreads has a thread pool of its own beside LibTorch's OpenMP one; with
  // more than one thread each, the two spin against each other between operations (measured
  // on 2 cores: 25 M model fp32 training 459 vs 1,141 tokens/s, decode at concurrency 32 407
  // vs 1,666 tokens/s, against OpenBLAS built on OpenMP, which shares LibTorch's pool).
  using GetParallel = int (*)();
  auto get_parallel = reinterpret_cast<GetParallel>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"));
  constexpr int kOpenBlasPthreads = 1;
  if (threads > 1 && speaks && get_parallel && get_parallel() == kOpenBlasPthreads)
    log::warn("[train] intra_op_threads = ", threads, " with OpenBLAS's pthreads build (libopenblas0-pthread): ",
              "its thread pool and LibTorch's OpenMP pool contend (2-4x slower); select the OpenMP build ",
              "(scripts/setup.sh does: libopenblas0-openmp + update-alternatives) or use 1 thread per rank");
}

}  // namespace

void configure_threads(const Config& cfg, const World* world) {
  int threads = static_cast<int>(cfg.train.intra_op_threads);
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  const int local = world ? world->local_size() : 1;
  if (threads <= 0) {
    threads = default_threads_per_rank(local);
  } else if (cores > 0 && threads * local > cores && (!world || world->is_root())) {
    // Oversubscribed threads spin against each other (64 threads on 2 cores ran 13x slower).
    log::warn("[train] intra_op_threads = ", threads, " x ", local, " rank(s) on this host = ", threads * local,
              " threads for ", cores, " cores: expect a large slowdown; use 0 (cores / ranks)");
  } else if (threads > cores_available() && (!world || world->is_root())) {
    log::warn("[train] intra_op_threads = ", threads, " but this rank may only run on ", cores_available(),
              " core(s) (mpirun binds each rank to one core by default for up to 2 ranks): its threads ",
              "share them; run mpirun with --bind-to none (scripts/mpirun.sh does) or --map-by slot:PE=", threads);
  }
  at::set_num_threads(threads);
  // LibTorch sets OpenMP's threads only; OpenBLAS (Debian's libblas.so.3, which fp32 matmul
  // uses) may keep its own pool, one thread per core by default: ranks sharing a host would
  // oversubscribe it. Looked up at run time because the BLAS is whatever libtorch loaded.
  using SetThreads = void (*)(int);
  if (auto set_blas = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads")))
    set_blas(threads);
  warn_if_blas_pool_contends(threads, !world || world->is_root());
}

}  // namespace andy
