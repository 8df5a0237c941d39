// Command-line plumbing shared by the subcommands: flag specs, parsing (--name value,
// --name=value; '-' and '_' interchangeable), help text, and the config flags every
// config-driven subcommand accepts (--config, --set, the Python-workflow names).
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/base/error.h"
#include "core/config/config.h"
#include "parallel/process_grid.h"

namespace andy {

class World;

struct Flag {
  std::string name;       // without dashes, e.g. "batch_size"
  std::string metavar;    // "N", "PATH"; empty for a switch
  std::string help;
  bool repeatable = false;
};

class ParsedArgs {
 public:
  bool has(const std::string& name) const;
  // The value of the last given of several alias flags ({"model_path", "model"}), or "".
  std::string get_any(std::initializer_list<const char*> names) const;
  // Last value given for `name`, or `fallback`.
  std::string get(const std::string& name, const std::string& fallback = "") const;
  double get_double(const std::string& name, double fallback) const;
  int64_t get_int(const std::string& name, int64_t fallback) const;
  // Every (flag, value) in command-line order; switches have value "true".
  const std::vector<std::pair<std::string, std::string>>& ordered() const { return ordered_; }
  const std::vector<std::string>& positional() const { return positional_; }
  // Appends a flag as if given last on the command line (a command mapping its own flags onto
  // --set entries, e.g. --resume PATH to --set checkpoint.resume=PATH).
  void append(const std::string& flag, const std::string& value) { ordered_.push_back({flag, value}); }
  void append_positional(const std::string& arg) { positional_.push_back(arg); }

 private:
  std::vector<std::pair<std::string, std::string>> ordered_;
  std::vector<std::string> positional_;
};

// Parses argv[start..]; throws ConfigError on unknown flags (with a suggestion) or a missing
// value. "--help" is recorded as the switch "help".
ParsedArgs parse_flags(const std::string& command, const std::vector<Flag>& flags, int argc,
                       char** argv, int start);
std::string format_flags_help(const std::vector<Flag>& flags);

struct Subcommand {
  std::string name;
  std::string summary;  // one line for `andyllm --help`
  std::string usage;    // first lines of `andyllm NAME --help`
  std::vector<Flag> flags;
  bool needs_mpi = false;  // initialise the World before run()
  std::function<int(const ParsedArgs&, World*)> run;
};

// --config, --set, --train_file ... --fp16, --print-config, --help-config.
std::vector<Flag> config_flags();
// defaults < --config file < (--set and named flags, in command-line order). ConfigError for
// --config given twice or naming a directory.
Config load_config(const ParsedArgs& args);
// ConfigError when more than `allowed` positional arguments were given (a run config passed
// without --config would otherwise be ignored).
void reject_positional(const ParsedArgs& args, const std::string& command, size_t allowed = 0);
// Answers --help-config / --print-config; returns true when it printed and the command is done.
bool handle_config_info_flags(const ParsedArgs& args, const Config& cfg,
                              const std::string& extra_info = "");

// With train.device = cuda: a ConfigError unless LibTorch sees a GPU for every local rank.
void check_device_available(const Config& cfg, const World* world);

// Loads and validates the config on every rank (device availability included); if any rank fails, every rank throws
// Agreed<ConfigError> (run_agreed), reported by the lowest failing rank only (printed once).
Config load_config_collectively(const ParsedArgs& args, World* world);

// The process grid a run asks for, one rule for train, bench train, serve and generate: `tp_size`
// ranks per tensor-parallel group; parallel.backend (auto: NCCL on cuda, MPI on cpu); on cuda
// this rank's GPU (one per local rank); parallel.collective_timeout_s. `device`: the command's
// device key (train.device or serve.device), `device_key` its name for messages.
GridOptions grid_options_from(const Config& cfg, const std::string& device, const std::string& device_key,
                              int tp_size, World* world);

// Sets LibTorch intra-op threads and, when the BLAS is OpenBLAS, its thread pool too:
// train.intra_op_threads, or host cores / ranks on the host.
void configure_threads(const Config& cfg, const World* world);

}  // namespace andy
