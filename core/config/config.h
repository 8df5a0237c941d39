// Run configuration: typed sections, a schema (type, default, range, description per key),
// TOML loading with file:line errors, command-line overrides and consistency checks.
// Precedence: schema defaults < TOML file < command-line (--set and named flags, in order).
// Every user mistake throws andy::ConfigError with a one-line message naming the source
// (file:line or the flag), the key and what was expected.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <variant>
#include <vector>

namespace andy {

struct ModelConfig {
  int64_t dim = 256;
  int64_t n_layer = 4;
  int64_t n_head = 8;
  int64_t n_kv_head = 4;
  int64_t ffn_dim = 0;  // 0: derived as LLaMA does from dim and ffn_multiple_of
  int64_t ffn_multiple_of = 32;
  int64_t vocab_size = 4096;
  int64_t max_seq_len = 256;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  bool tie_embeddings = true;
  double init_std = 0.02;
};

struct DataConfig {
  std::string train_file = "data/demo/processed/train";
  std::string val_file = "data/demo/processed/validation";
  std::string tokenizer_path = "data/demo/processed/tokenizer.model";
  int64_t seq_len = 128;
  int64_t prefetch_batches = 4;
  bool verify_checksums = true;  // shards checked against manifest.json when the run starts
};

struct TrainConfig {
  std::string output_dir = "outputs/run";
  std::string device = "cpu";
  int64_t seed = 1234;
  int64_t batch_size = 8;
  int64_t gradient_accumulation_steps = 1;
  int64_t num_epochs = 1;
  int64_t max_steps = 0;  // 0: run num_epochs
  double learning_rate = 3e-4;
  double min_learning_rate = 3e-5;
  int64_t warmup_steps = 20;
  double weight_decay = 0.1;
  bool decay_norms_and_embeddings = false;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;
  int64_t log_interval = 10;
  int64_t eval_interval = 100;
  int64_t eval_batches = 16;
  double bucket_size_mb = 25.0;
  double first_bucket_mb = 1.0;
  double peak_tflops = 0.0;  // 0: measured (CPU) or looked up (GPU); unknown if neither
  int64_t intra_op_threads = 0;  // 0: cores per rank on this host
  int64_t max_skipped_steps = 20;  // fp16: consecutive overflow skips before the run stops
};

struct ParallelConfig {
  int64_t tensor_parallel_size = 1;
  std::string backend = "auto";  // auto: nccl for cuda, mpi for cpu
  double collective_timeout_s = 300.0;
  // ZeRO-1 (Megatron-LM's distributed optimizer): each DP rank keeps and updates the AdamW
  // state of 1/dp of the parameters; gradients are reduce-scattered, parameters all-gathered.
  bool distributed_optimizer = true;
};

struct PrecisionConfig {
  std::string mode = "fp32";
  double loss_scale_init = 65536.0;
  double loss_scale_growth_factor = 2.0;
  double loss_scale_backoff = 0.5;
  int64_t loss_scale_growth_interval = 2000;
  double loss_scale_min = 1.0;
  bool fp32_residual = true;
};

struct CheckpointConfig {
  int64_t interval = 500;
  int64_t keep_last = 3;
  std::string resume = "auto";
  std::string existing = "refuse";  // a fresh run over an earlier run's checkpoints
};

struct ServeConfig {
  std::string host = "127.0.0.1";
  int64_t port = 8000;
  std::string model = "";           // best_model/ dir, its model.pt, or a checkpoint step dir
  std::string tokenizer_path = "";  // "": the one named by the model's saved config
  std::string served_model_name = "";
  std::string api_key = "";
  std::string device = "cpu";
  int64_t block_size = 16;
  double kv_cache_memory = 0.0;     // bytes; <= 1: fraction of free GPU memory; 0: auto
  int64_t num_kv_blocks = 0;        // exact pool size (overrides kv_cache_memory); 0: from it
  double swap_space = 0.0;          // GiB of host memory per rank for swapped-out KV blocks
  std::string dtype = "auto";           // weights and activations: auto (as stored: fp32), fp32, bf16
  std::string kv_cache_dtype = "auto";  // auto (the weights' dtype), fp32, bf16, fp16
  bool cpu_packed_weights = true;       // CPU: multi-row products through weights packed once
  int64_t max_num_seqs = 32;
  int64_t max_num_batched_tokens = 512;
  int64_t max_model_len = 0;        // 0: model.max_seq_len
  bool enable_prefix_caching = true;
  int64_t seed = 0;
  int64_t max_tokens_default = 256;
  int64_t max_waiting = 1024;
  double shutdown_timeout_s = 30.0;
  int64_t max_request_bytes = 8 << 20;
  std::string chat_template = "andyllm";  // serve/openai_protocol.h: "andyllm" or "plain"
};

struct Config {
  ModelConfig model;
  DataConfig data;
  TrainConfig train;
  ParallelConfig parallel;
  PrecisionConfig precision;
  CheckpointConfig checkpoint;
  ServeConfig serve;
  // Where each non-default value came from, by "section.key": "file.toml:12" or "--set".
  std::map<std::string, std::string> origin;

  // "file.toml:12" / "--batch_size" / "default" for a "section.key".
  std::string origin_of(const std::string& dotted) const;
};

using ConfigValue = std::variant<int64_t, double, bool, std::string>;
enum class ValueType { kInt, kFloat, kBool, kString };

// One key of the schema. Ranges are inclusive; `choices` restricts strings.
struct KeySpec {
  std::string section;
  std::string key;
  ValueType type;
  std::string description;
  bool has_min = false, has_max = false;
  double min = 0, max = 0;
  bool min_exclusive = false;
  std::vector<std::string> choices;
  std::function<ConfigValue(const Config&)> get;
  std::function<void(Config&, const ConfigValue&)> set;

  std::string dotted() const { return section + "." + key; }
  std::string type_name() const;
  std::string range_text() const;  // "1 <= value <= 1024", "one of fp32, bf16, fp16", ""
};

// All keys, in the order they are printed.
const std::vector<KeySpec>& config_schema();
const KeySpec* find_key(const std::string& section, const std::string& key);

// Applies a TOML file on top of `cfg`. Throws ConfigError (file:line, key, expectation).
void apply_toml_file(Config& cfg, const std::string& path);
// Applies TOML text (as from a file named `source_name`).
void apply_toml_string(Config& cfg, const std::string& text, const std::string& source_name);
// Applies only the named sections of TOML text (a saved config read for its [model] and
// [data], whose other sections may come from another version).
void apply_toml_sections(Config& cfg, const std::string& text, const std::string& source_name,
                         const std::vector<std::string>& sections);
// Applies "section.key=value" (from --set); `origin` names the flag in errors
// (default: "--set section.key=value").
void apply_set(Config& cfg, const std::string& assignment, const std::string& origin = "");
// Sets one key from its textual value, type-checked and range-checked.
void apply_value_text(Config& cfg, const std::string& dotted, const std::string& text,
                      const std::string& origin);

// Cross-key checks (heads divisible by TP, world divisible by TP, ...). world_size <= 0
// skips the checks that need the world size. Throws ConfigError naming every key involved.
void validate_config(const Config& cfg, int world_size);

// ffn_dim, or when 0 LLaMA's int(2 * 4 * dim / 3) rounded up to ffn_multiple_of.
int64_t derived_ffn_dim(const ModelConfig& m);
// dim / n_head.
int64_t head_dim(const ModelConfig& m);

// The model's shape rules, in one place: validate_config applies them to a run's config and
// validate_model_shapes (core/model/model_config.h) to any model. One entry per broken rule,
// in a fixed order: the key to blame and the sentence. `describe(dotted_key)` renders a key with
// its value (validate_config adds where the value came from). The TP size is
// cfg.parallel.tensor_parallel_size.
// "model.dim = 64": a key and its value in `cfg`, for messages.
std::string key_with_value(const Config& cfg, const std::string& dotted_key);
struct ShapeProblem {
  std::string key;
  std::string message;
};
std::vector<ShapeProblem> model_shape_problems(const Config& cfg,
                                               const std::function<std::string(const std::string&)>& describe);

// The effective config as TOML (every key, with its origin as a comment).
std::string config_to_toml(const Config& cfg);
// Human-readable schema: every key with type, default, range and description.
std::string config_schema_help();

// Closest candidate by edit distance, or "" when nothing is close.
std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace andy
