// Config schema, TOML++ loading, --set overrides and cross-key validation.
// Adding a key: add the field to a section struct in config.h and one line to build_schema().
#include "core/config/config.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <iomanip>
#include <limits>
#include <sstream>
#include <toml++/toml.h>

#include "core/base/error.h"

namespace andy {

namespace {

template <typename Section, typename Field>
KeySpec make_key(Section Config::*sec, Field Section::*field, const char* section, const char* key,
                 ValueType type, const char* desc) {
  KeySpec k;
  k.section = section;
  k.key = key;
  k.type = type;
  k.description = desc;
  k.get = [sec, field](const Config& c) -> ConfigValue { return ConfigValue((c.*sec).*field); };
  k.set = [sec, field](Config& c, const ConfigValue& v) { (c.*sec).*field = std::get<Field>(v); };
  return k;
}

template <typename Section>
KeySpec int_key(int64_t Section::*f, Section Config::*s, const char* sec, const char* key,
                double lo, double hi, const char* desc) {
  KeySpec k = make_key(s, f, sec, key, ValueType::kInt, desc);
  k.has_min = k.has_max = true;
  k.min = lo;
  k.max = hi;
  return k;
}

template <typename Section>
KeySpec float_key(double Section::*f, Section Config::*s, const char* sec, const char* key,
                  double lo, double hi, bool lo_exclusive, const char* desc) {
  KeySpec k = make_key(s, f, sec, key, ValueType::kFloat, desc);
  k.has_min = k.has_max = true;
  k.min = lo;
  k.max = hi;
  k.min_exclusive = lo_exclusive;
  return k;
}

template <typename Section>
KeySpec bool_key(bool Section::*f, Section Config::*s, const char* sec, const char* key,
                 const char* desc) {
  return make_key(s, f, sec, key, ValueType::kBool, desc);
}

template <typename Section>
KeySpec str_key(std::string Section::*f, Section Config::*s, const char* sec, const char* key,
                std::vector<std::string> choices, const char* desc) {
  KeySpec k = make_key(s, f, sec, key, ValueType::kString, desc);
  k.choices = std::move(choices);
  return k;
}

constexpr double kBig = 1e15;

std::vector<KeySpec> build_schema() {
  using C = Config;
  std::vector<KeySpec> s;
  // [model]
  s.push_back(int_key(&ModelConfig::dim, &C::model, "model", "dim", 8, 65536, "hidden size (embedding width)"));
  s.push_back(int_key(&ModelConfig::n_layer, &C::model, "model", "n_layer", 1, 1024, "number of transformer blocks"));
  s.push_back(int_key(&ModelConfig::n_head, &C::model, "model", "n_head", 1, 1024, "attention (query) heads"));
  s.push_back(int_key(&ModelConfig::n_kv_head, &C::model, "model", "n_kv_head", 1, 1024, "key/value heads (grouped-query attention); divides n_head"));
  s.push_back(int_key(&ModelConfig::ffn_dim, &C::model, "model", "ffn_dim", 0, 1 << 20, "SwiGLU hidden size; 0 derives it as LLaMA does (8/3 dim rounded up to ffn_multiple_of)"));
  s.push_back(int_key(&ModelConfig::ffn_multiple_of, &C::model, "model", "ffn_multiple_of", 1, 65536, "rounding of the derived ffn_dim"));
  s.push_back(int_key(&ModelConfig::vocab_size, &C::model, "model", "vocab_size", 2, 1 << 24, "tokenizer vocabulary size (padded internally for tensor parallelism)"));
  s.push_back(int_key(&ModelConfig::max_seq_len, &C::model, "model", "max_seq_len", 1, 1 << 20, "longest sequence (RoPE table and KV cache length)"));
  s.push_back(float_key(&ModelConfig::norm_eps, &C::model, "model", "norm_eps", 0, 1, true, "RMSNorm epsilon"));
  s.push_back(float_key(&ModelConfig::rope_theta, &C::model, "model", "rope_theta", 1, 1e9, false, "RoPE base frequency"));
  s.push_back(bool_key(&ModelConfig::tie_embeddings, &C::model, "model", "tie_embeddings", "share the token embedding with the output head"));
  s.push_back(float_key(&ModelConfig::init_std, &C::model, "model", "init_std", 0, 10, true, "standard deviation of the normal weight initialisation"));
  // [data]
  s.push_back(str_key(&DataConfig::train_file, &C::data, "data", "train_file", {}, "training shards: a directory of .h5 files, a glob, or one .h5 file"));
  s.push_back(str_key(&DataConfig::val_file, &C::data, "data", "val_file", {}, "validation shards (directory, glob or file); empty disables validation"));
  s.push_back(str_key(&DataConfig::tokenizer_path, &C::data, "data", "tokenizer_path", {}, "sentencepiece tokenizer.model the shards were made with"));
  s.push_back(int_key(&DataConfig::seq_len, &C::data, "data", "seq_len", 1, 1 << 20, "tokens per training sequence (<= model.max_seq_len)"));
  s.push_back(int_key(&DataConfig::prefetch_batches, &C::data, "data", "prefetch_batches", 0, 1024, "batches read ahead on the loader thread"));
  s.push_back(bool_key(&DataConfig::verify_checksums, &C::data, "data", "verify_checksums", "check every shard's checksum against manifest.json when the run starts (one read of the data; turn off for huge datasets)"));
  // [train]
  s.push_back(str_key(&TrainConfig::output_dir, &C::train, "train", "output_dir", {}, "where checkpoints, metrics.jsonl and config.toml are written"));
  s.push_back(str_key(&TrainConfig::device, &C::train, "train", "device", {"cpu", "cuda"}, "cpu, or cuda (each local rank takes its own GPU)"));
  s.push_back(int_key(&TrainConfig::seed, &C::train, "train", "seed", 0, kBig, "seed for initialisation and data order"));
  s.push_back(int_key(&TrainConfig::batch_size, &C::train, "train", "batch_size", 1, 1 << 20, "micro-batch size per data-parallel rank (sequences)"));
  s.push_back(int_key(&TrainConfig::gradient_accumulation_steps, &C::train, "train", "gradient_accumulation_steps", 1, 1 << 20, "micro-batches per optimizer step"));
  s.push_back(int_key(&TrainConfig::num_epochs, &C::train, "train", "num_epochs", 1, 1 << 20, "epochs to train when max_steps is 0"));
  s.push_back(int_key(&TrainConfig::max_steps, &C::train, "train", "max_steps", 0, kBig, "optimizer steps to train; 0 means num_epochs"));
  s.push_back(float_key(&TrainConfig::learning_rate, &C::train, "train", "learning_rate", 0, 10, true, "peak learning rate"));
  s.push_back(float_key(&TrainConfig::min_learning_rate, &C::train, "train", "min_learning_rate", 0, 10, false, "learning rate at the end of the cosine decay"));
  s.push_back(int_key(&TrainConfig::warmup_steps, &C::train, "train", "warmup_steps", 0, kBig, "linear warmup steps"));
  s.push_back(float_key(&TrainConfig::weight_decay, &C::train, "train", "weight_decay", 0, 10, false, "AdamW decoupled weight decay"));
  s.push_back(bool_key(&TrainConfig::decay_norms_and_embeddings, &C::train, "train", "decay_norms_and_embeddings", "also apply weight decay to norms and embeddings"));
  s.push_back(float_key(&TrainConfig::beta1, &C::train, "train", "beta1", 0, 1, false, "AdamW beta1"));
  s.push_back(float_key(&TrainConfig::beta2, &C::train, "train", "beta2", 0, 1, false, "AdamW beta2"));
  s.push_back(float_key(&TrainConfig::adam_eps, &C::train, "train", "adam_eps", 0, 1, true, "AdamW epsilon"));
  s.push_back(float_key(&TrainConfig::grad_clip, &C::train, "train", "grad_clip", 0, 1e9, false, "clip the global gradient norm to this; 0 disables"));
  s.push_back(int_key(&TrainConfig::log_interval, &C::train, "train", "log_interval", 1, kBig, "steps between progress lines"));
  s.push_back(int_key(&TrainConfig::eval_interval, &C::train, "train", "eval_interval", 1, kBig, "steps between validations"));
  s.push_back(int_key(&TrainConfig::eval_batches, &C::train, "train", "eval_batches", 1, kBig, "validation batches per evaluation (fixed subset)"));
  s.push_back(float_key(&TrainConfig::bucket_size_mb, &C::train, "train", "bucket_size_mb", 0, 1e6, true, "gradient all-reduce bucket size in MiB"));
  s.push_back(float_key(&TrainConfig::first_bucket_mb, &C::train, "train", "first_bucket_mb", 0, 1e6, true, "size in MiB of the first gradient bucket (the last layers), small so the all-reduce starts early"));
  s.push_back(float_key(&TrainConfig::peak_tflops, &C::train, "train", "peak_tflops", 0, 1e6, false, "device peak TFLOP/s for MFU; 0 means measured or unknown"));
  s.push_back(int_key(&TrainConfig::intra_op_threads, &C::train, "train", "intra_op_threads", 0, 4096, "LibTorch threads per rank; 0 means host cores / ranks on the host"));
  s.push_back(int_key(&TrainConfig::max_skipped_steps, &C::train, "train", "max_skipped_steps", 1, kBig, "fp16: consecutive steps skipped for overflow before the run stops as diverged (fp32/bf16 stop at the first non-finite loss or gradient)"));
  // [parallel]
  s.push_back(int_key(&ParallelConfig::tensor_parallel_size, &C::parallel, "parallel", "tensor_parallel_size", 1, 4096, "ranks that split each layer; world size must be a multiple"));
  s.push_back(str_key(&ParallelConfig::backend, &C::parallel, "parallel", "backend", {"auto", "mpi", "nccl"}, "communication backend; auto picks nccl on cuda, mpi on cpu"));
  s.push_back(float_key(&ParallelConfig::collective_timeout_s, &C::parallel, "parallel", "collective_timeout_s", 0, 1e7, true, "a collective not done after this many seconds aborts the job"));
  s.push_back(bool_key(&ParallelConfig::distributed_optimizer, &C::parallel, "parallel", "distributed_optimizer", "ZeRO-1: each DP rank holds and updates the AdamW state of 1/dp of the parameters (gradients reduce-scattered, parameters all-gathered); false: every DP rank all-reduces the gradients and updates all parameters; checkpoints are the same either way"));
  // [precision]
  s.push_back(str_key(&PrecisionConfig::mode, &C::precision, "precision", "mode", {"fp32", "bf16", "fp16"}, "fp32, bf16 (autocast, CPU and GPU) or fp16 (autocast + loss scaling, GPU)"));
  s.push_back(float_key(&PrecisionConfig::loss_scale_init, &C::precision, "precision", "loss_scale_init", 0, 1e30, true, "fp16: initial loss scale"));
  s.push_back(float_key(&PrecisionConfig::loss_scale_growth_factor, &C::precision, "precision", "loss_scale_growth_factor", 1, 1e3, true, "fp16: factor applied after growth_interval good steps"));
  s.push_back(float_key(&PrecisionConfig::loss_scale_backoff, &C::precision, "precision", "loss_scale_backoff", 0, 1, true, "fp16: factor applied on overflow"));
  s.push_back(int_key(&PrecisionConfig::loss_scale_growth_interval, &C::precision, "precision", "loss_scale_growth_interval", 1, kBig, "fp16: good steps before the scale grows"));
  s.push_back(bool_key(&PrecisionConfig::fp32_residual, &C::precision, "precision", "fp32_residual", "bf16/fp16: keep the residual stream (embedding output, residual adds, norm inputs) in fp32 as PyTorch autocast does; false keeps it in the compute dtype as llm.c and Megatron-LM do (less memory traffic, the faster GPU step)"));
  s.push_back(float_key(&PrecisionConfig::loss_scale_min, &C::precision, "precision", "loss_scale_min", 0, 1e30, true, "fp16: the scale never falls below this"));
  // [checkpoint]
  s.push_back(int_key(&CheckpointConfig::interval, &C::checkpoint, "checkpoint", "interval", 1, kBig, "steps between checkpoints (one is always written at the end)"));
  s.push_back(int_key(&CheckpointConfig::keep_last, &C::checkpoint, "checkpoint", "keep_last", 1, 1 << 20, "complete checkpoints kept; older ones are pruned"));
  s.push_back(str_key(&CheckpointConfig::resume, &C::checkpoint, "checkpoint", "resume", {}, "auto (latest complete checkpoint if any), none, or a step directory"));
  s.push_back(str_key(&CheckpointConfig::existing, &C::checkpoint, "checkpoint", "existing", {"refuse", "archive", "replace"}, "a fresh run (nothing resumed) into an output_dir holding an earlier run's checkpoints or best_model: refuse, archive them under output_dir/archive/, or replace (delete) them"));
  // [serve]
  s.push_back(str_key(&ServeConfig::host, &C::serve, "serve", "host", {}, "address the HTTP server binds (127.0.0.1: this machine only)"));
  s.push_back(int_key(&ServeConfig::port, &C::serve, "serve", "port", 0, 65535, "HTTP port (0: any free port)"));
  s.push_back(str_key(&ServeConfig::model, &C::serve, "serve", "model", {}, "model to serve: a best_model/ directory, its model.pt, or a training checkpoint step directory"));
  s.push_back(str_key(&ServeConfig::tokenizer_path, &C::serve, "serve", "tokenizer_path", {}, "sentencepiece model; empty: the one named by the model's saved config"));
  s.push_back(str_key(&ServeConfig::served_model_name, &C::serve, "serve", "served_model_name", {}, "model id in the API; empty: the model directory's name"));
  s.push_back(str_key(&ServeConfig::api_key, &C::serve, "serve", "api_key", {}, "bearer key required by /v1 routes; empty: none"));
  s.push_back(str_key(&ServeConfig::device, &C::serve, "serve", "device", {"cpu", "cuda"}, "cpu, or cuda (each local rank takes its own GPU)"));
  s.push_back(int_key(&ServeConfig::block_size, &C::serve, "serve", "block_size", 1, 4096, "tokens per paged KV-cache block"));
  s.push_back(float_key(&ServeConfig::kv_cache_memory, &C::serve, "serve", "kv_cache_memory", 0, 1e15, false, "KV-cache pool per rank: bytes, or a fraction (<= 1) of free GPU memory; 0: room for max_num_seqs sequences of max_model_len (CPU) or 0.9 of free memory (GPU)"));
  s.push_back(int_key(&ServeConfig::num_kv_blocks, &C::serve, "serve", "num_kv_blocks", 0, kBig, "exact KV-cache pool size in blocks (overrides kv_cache_memory); 0: from kv_cache_memory"));
  s.push_back(float_key(&ServeConfig::swap_space, &C::serve, "serve", "swap_space", 0, 1e6, false, "GiB of host memory per rank for KV blocks of preempted requests; 0: preemption recomputes"));
  s.push_back(str_key(&ServeConfig::dtype, &C::serve, "serve", "dtype", {"auto", "fp32", "bf16", "fp16"}, "weights and activations of the served model: auto (as stored, fp32), fp32, bf16 (half the weight memory; on CPU the batched products run through oneDNN's bf16 kernels) or fp16 (GPU only)"));
  s.push_back(str_key(&ServeConfig::kv_cache_dtype, &C::serve, "serve", "kv_cache_dtype", {"auto", "fp32", "bf16", "fp16"}, "element type of the KV cache: auto (the weights' dtype), fp32, bf16 or fp16 (half the memory and bytes read per decode step; keys and values rounded to 8 or 11 significant bits)"));
  s.push_back(bool_key(&ServeConfig::cpu_packed_weights, &C::serve, "serve", "cpu_packed_weights", "CPU: the products of batched decode steps (2 to 64 rows) read a copy of each weight packed once into oneDNN's kernel layout (one more copy of the weights in memory; 32-row products 1.0-1.7x as fast in fp32, 2-2.5x in bf16)"));
  s.push_back(int_key(&ServeConfig::max_num_seqs, &C::serve, "serve", "max_num_seqs", 1, 65536, "sequences in one engine step at most"));
  s.push_back(int_key(&ServeConfig::max_num_batched_tokens, &C::serve, "serve", "max_num_batched_tokens", 1, 1 << 24, "tokens in one engine step at most (prefill chunks and decodes)"));
  s.push_back(int_key(&ServeConfig::max_model_len, &C::serve, "serve", "max_model_len", 0, 1 << 24, "prompt + completion tokens at most; 0: model.max_seq_len"));
  s.push_back(bool_key(&ServeConfig::enable_prefix_caching, &C::serve, "serve", "enable_prefix_caching", "reuse the KV blocks of shared prompt prefixes"));
  s.push_back(int_key(&ServeConfig::seed, &C::serve, "serve", "seed", 0, kBig, "seed of requests that give none"));
  s.push_back(int_key(&ServeConfig::max_tokens_default, &C::serve, "serve", "max_tokens_default", 1, 1 << 20, "max_tokens when a request gives none"));
  s.push_back(int_key(&ServeConfig::max_waiting, &C::serve, "serve", "max_waiting", 1, 1 << 24, "requests waiting for the engine at most (more: 429)"));
  s.push_back(float_key(&ServeConfig::shutdown_timeout_s, &C::serve, "serve", "shutdown_timeout_s", 0, 1e6, false, "on SIGTERM, seconds running requests may take to finish"));
  s.push_back(int_key(&ServeConfig::max_request_bytes, &C::serve, "serve", "max_request_bytes", 1, 1LL << 32, "largest HTTP request body (more: 413)"));
  s.push_back(str_key(&ServeConfig::chat_template, &C::serve, "serve", "chat_template", {"andyllm", "plain"}, "how /v1/chat/completions turns messages into a prompt: andyllm (<|role|> lines, then <|assistant|>) or plain (the contents, one per line); see serve/openai_protocol.h"));
  return s;
}

std::string trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t");
  size_t e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

std::string format_value(const ConfigValue& v) {
  std::ostringstream os;
  if (auto* i = std::get_if<int64_t>(&v)) {
    os << *i;
  } else if (auto* d = std::get_if<double>(&v)) {
    os << std::setprecision(10) << *d;
    std::string t = os.str();
    if (t.find_first_of(".eEn") == std::string::npos) t += ".0";  // stay a TOML float
    return t;
  } else if (auto* b = std::get_if<bool>(&v)) {
    os << (*b ? "true" : "false");
  } else {
    os << std::quoted(std::get<std::string>(v));
  }
  return os.str();
}

std::string fmt_num(double x) {
  std::ostringstream os;
  os << std::setprecision(10) << x;
  return os.str();
}

[[noreturn]] void fail(const std::string& origin, const std::string& msg) {
  throw ConfigError(origin + ": " + msg);
}

// Range and choice checks shared by the TOML and command-line paths.
void check_and_set(Config& cfg, const KeySpec& k, const ConfigValue& v, const std::string& origin) {
  std::string name = "[" + k.section + "] " + k.key + " = " + format_value(v);
  if (k.type == ValueType::kInt || k.type == ValueType::kFloat) {
    double x = k.type == ValueType::kInt ? static_cast<double>(std::get<int64_t>(v)) : std::get<double>(v);
    bool bad = std::isnan(x) || (k.has_max && x > k.max) ||
               (k.has_min && (k.min_exclusive ? x <= k.min : x < k.min));
    if (bad) fail(origin, name + ": out of range, expected " + k.range_text());
  }
  if (!k.choices.empty()) {
    const auto& s = std::get<std::string>(v);
    if (std::find(k.choices.begin(), k.choices.end(), s) == k.choices.end()) {
      std::string hint = did_you_mean(s, k.choices);
      fail(origin, name + ": expected " + k.range_text() + (hint.empty() ? "" : " (did you mean '" + hint + "'?)"));
    }
  }
  k.set(cfg, v);
  cfg.origin[k.dotted()] = origin;
}

std::vector<std::string> section_names() {
  std::vector<std::string> out;
  for (const auto& k : config_schema())
    if (std::find(out.begin(), out.end(), k.section) == out.end()) out.push_back(k.section);
  return out;
}

std::vector<std::string> keys_of(const std::string& section) {
  std::vector<std::string> out;
  for (const auto& k : config_schema())
    if (k.section == section) out.push_back(k.key);
  return out;
}

// Unknown key message with a suggestion from the same section, else from any section.
std::string unknown_key_message(const std::string& section, const std::string& key) {
  std::string msg = "unknown key [" + section + "] " + key;
  std::string hint = did_you_mean(key, keys_of(section));
  if (!hint.empty()) return msg + " (did you mean '" + hint + "'?)";
  for (const auto& k : config_schema()) {
    if (k.key == key) return msg + " (did you mean [" + k.section + "] " + k.key + "?)";
  }
  return msg + "; see 'andyllm train --help-config' for every key";
}

std::string type_word(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "a date/time";
  }
}

void apply_table(Config& cfg, const toml::table& root, const std::string& source) {
  auto line_of = [&](const toml::node& n) {
    return source + ":" + std::to_string(n.source().begin.line);
  };
  for (const auto& [sec_key, sec_node] : root) {
    std::string section(sec_key.str());
    const toml::table* table = sec_node.as_table();
    if (!table) {
      fail(line_of(sec_node), "key '" + section + "' outside a section; expected a section such as [train]");
    }
    auto secs = section_names();
    if (std::find(secs.begin(), secs.end(), section) == secs.end()) {
      std::string hint = did_you_mean(section, secs);
      fail(line_of(sec_node), "unknown section [" + section + "]" +
                                  (hint.empty() ? "" : " (did you mean [" + hint + "]?)"));
    }
    for (const auto& [key_node_key, node] : *table) {
      std::string key(key_node_key.str());
      std::string origin = line_of(node);
      const KeySpec* k = find_key(section, key);
      if (!k) fail(origin, unknown_key_message(section, key));
      std::string name = "[" + section + "] " + key;
      ConfigValue v;
      switch (k->type) {
        case ValueType::kInt:
          if (!node.is_integer()) fail(origin, name + ": expected an integer, got " + type_word(node));
          v = node.as_integer()->get();
          break;
        case ValueType::kFloat:
          if (node.is_integer()) {
            v = static_cast<double>(node.as_integer()->get());
          } else if (node.is_floating_point()) {
            v = node.as_floating_point()->get();
          } else {
            fail(origin, name + ": expected a number, got " + type_word(node));
          }
          break;
        case ValueType::kBool:
          if (!node.is_boolean()) fail(origin, name + ": expected true or false, got " + type_word(node));
          v = node.as_boolean()->get();
          break;
        case ValueType::kString:
          if (!node.is_string()) fail(origin, name + ": expected a string, got " + type_word(node));
          v = node.as_string()->get();
          break;
      }
      check_and_set(cfg, *k, v, origin);
    }
  }
}

size_t edit_distance(const std::string& a, const std::string& b) {
  // Optimal-string-alignment distance (Levenshtein plus adjacent transpositions).
  std::vector<size_t> prev2(b.size() + 1), prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
      // Transposition of two adjacent characters counts as one edit ("cdua" -> "cuda").
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1]) {
        cur[j] = std::min(cur[j], prev2[j - 2] + 1);
      }
    }
    prev2 = prev;
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

}  // namespace

std::string Config::origin_of(const std::string& dotted) const {
  auto it = origin.find(dotted);
  return it == origin.end() ? "default" : it->second;
}

std::string KeySpec::type_name() const {
  switch (type) {
    case ValueType::kInt: return "integer";
    case ValueType::kFloat: return "float";
    case ValueType::kBool: return "bool";
    case ValueType::kString: return "string";
  }
  return "?";
}

std::string KeySpec::range_text() const {
  if (!choices.empty()) {
    std::string out = "one of ";
    for (size_t i = 0; i < choices.size(); ++i) out += (i ? ", " : "") + choices[i];
    return out;
  }
  if (type == ValueType::kBool) return "true or false";
  if (!has_min && !has_max) return "";
  std::string out;
  if (has_min) out += fmt_num(min) + (min_exclusive ? " < " : " <= ");
  out += "value";
  if (has_max) out += " <= " + fmt_num(max);
  return out;
}

const std::vector<KeySpec>& config_schema() {
  static const std::vector<KeySpec> schema = build_schema();
  return schema;
}

const KeySpec* find_key(const std::string& section, const std::string& key) {
  for (const auto& k : config_schema())
    if (k.section == section && k.key == key) return &k;
  return nullptr;
}

std::string did_you_mean(const std::string& word, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_d = std::numeric_limits<size_t>::max();
  for (const auto& c : candidates) {
    size_t d = edit_distance(word, c);
    if (d < best_d) {
      best_d = d;
      best = c;
    }
  }
  size_t limit = std::max<size_t>(2, word.size() / 3);
  return best_d <= limit ? best : "";
}

namespace {
toml::table parse_toml_text(const std::string& text, const std::string& source_name) {
  try {
    return toml::parse(text, source_name);
  } catch (const toml::parse_error& e) {
    fail(source_name + ":" + std::to_string(e.source().begin.line),
         "TOML syntax error: " + std::string(e.description()));
  }
}
}  // namespace

void apply_toml_string(Config& cfg, const std::string& text, const std::string& source_name) {
  apply_table(cfg, parse_toml_text(text, source_name), source_name);
}

void apply_toml_sections(Config& cfg, const std::string& text, const std::string& source_name,
                         const std::vector<std::string>& sections) {
  const toml::table root = parse_toml_text(text, source_name);
  toml::table kept;
  for (const auto& name : sections)
    if (auto* t = root.get_as<toml::table>(name)) kept.insert(name, *t);
  apply_table(cfg, kept, source_name);
}

void apply_toml_file(Config& cfg, const std::string& path) {
  toml::table root;
  try {
    root = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    std::string desc(e.description());
    if (e.source().begin.line == 0 || desc.find("open") != std::string::npos) {
      fail(path, "cannot read config file: " + desc);
    }
    fail(path + ":" + std::to_string(e.source().begin.line), "TOML syntax error: " + desc);
  }
  apply_table(cfg, root, path);
}

void apply_value_text(Config& cfg, const std::string& dotted, const std::string& raw_text,
                      const std::string& origin) {
  size_t dot = dotted.find('.');
  if (dot == std::string::npos) {
    fail(origin, "'" + dotted + "': expected section.key (for example train.batch_size)");
  }
  std::string section = dotted.substr(0, dot), key = dotted.substr(dot + 1);
  auto secs = section_names();
  if (std::find(secs.begin(), secs.end(), section) == secs.end()) {
    std::string hint = did_you_mean(section, secs);
    fail(origin, "unknown section [" + section + "]" + (hint.empty() ? "" : " (did you mean [" + hint + "]?)"));
  }
  const KeySpec* k = find_key(section, key);
  if (!k) fail(origin, unknown_key_message(section, key));
  std::string text = trim(raw_text);
  std::string name = "[" + section + "] " + key + " = '" + text + "'";
  ConfigValue v;
  errno = 0;
  char* end = nullptr;
  switch (k->type) {
    case ValueType::kInt: {
      long long x = std::strtoll(text.c_str(), &end, 10);
      if (text.empty() || *end != '\0' || errno == ERANGE) fail(origin, name + ": expected an integer");
      v = static_cast<int64_t>(x);
      break;
    }
    case ValueType::kFloat: {
      double x = std::strtod(text.c_str(), &end);
      if (text.empty() || *end != '\0' || errno == ERANGE) fail(origin, name + ": expected a number");
      v = x;
      break;
    }
    case ValueType::kBool:
      if (text == "true" || text == "1" || text == "yes") v = true;
      else if (text == "false" || text == "0" || text == "no") v = false;
      else fail(origin, name + ": expected true or false");
      break;
    case ValueType::kString:
      if (text.size() >= 2 && (text.front() == '"' || text.front() == '\'') && text.back() == text.front()) {
        text = text.substr(1, text.size() - 2);
      }
      v = text;
      break;
  }
  check_and_set(cfg, *k, v, origin);
}

void apply_set(Config& cfg, const std::string& assignment, const std::string& origin_in) {
  std::string origin = origin_in.empty() ? "--set " + assignment : origin_in;
  size_t eq = assignment.find('=');
  if (eq == std::string::npos) {
    fail(origin, "'" + assignment + "': expected section.key=value (for example train.batch_size=4)");
  }
  apply_value_text(cfg, trim(assignment.substr(0, eq)), assignment.substr(eq + 1), origin);
}

void validate_config(const Config& cfg, int world_size) {
  if (cfg.train.output_dir.empty())
    fail("[train] output_dir (" + cfg.origin_of("train.output_dir") + ")",
         "empty: expected the directory for checkpoints, metrics.jsonl and config.toml");
  auto at = [&](const std::string& dotted) {
    const KeySpec* k = find_key(dotted.substr(0, dotted.find('.')), dotted.substr(dotted.find('.') + 1));
    return "[" + k->section + "] " + k->key + " = " + format_value(k->get(cfg)) + " (" +
           cfg.origin_of(dotted) + ")";
  };
  const auto& m = cfg.model;
  const int64_t tp = cfg.parallel.tensor_parallel_size;
  auto inconsistent = [&](const std::string& first_key, const std::string& msg) {
    std::string o = cfg.origin_of(first_key);
    fail(o == "default" ? "config" : o, msg);
  };
  for (const ShapeProblem& p : model_shape_problems(cfg, at)) inconsistent(p.key, p.message);
  if (cfg.data.seq_len > m.max_seq_len)
    inconsistent("data.seq_len", at("data.seq_len") + " is longer than " + at("model.max_seq_len"));
  if (cfg.train.min_learning_rate > cfg.train.learning_rate)
    inconsistent("train.min_learning_rate", at("train.min_learning_rate") + " is above " + at("train.learning_rate"));
  if (cfg.precision.mode == "fp16" && cfg.train.device == "cpu")
    inconsistent("precision.mode", at("precision.mode") + " cannot run with " + at("train.device") +
                                       ": LibTorch has no fp16 matmul on CPU; use precision.mode=bf16 on CPU, or --device cuda");
  if (cfg.parallel.backend == "nccl" && cfg.train.device == "cpu")
    inconsistent("parallel.backend", at("parallel.backend") + " needs " + "[train] device = \"cuda\"" +
                                         ": NCCL only moves GPU tensors; use backend=mpi or auto on CPU");
  if (world_size > 0 && world_size % tp != 0)
    inconsistent("parallel.tensor_parallel_size",
                 "world size " + std::to_string(world_size) + " (mpirun -np) is not divisible by " +
                     at("parallel.tensor_parallel_size") + ": world size = tensor_parallel_size x data-parallel size");
}

std::string key_with_value(const Config& cfg, const std::string& dotted) {
  const size_t dot = dotted.find('.');
  const KeySpec* k = find_key(dotted.substr(0, dot), dotted.substr(dot + 1));
  ANDY_CHECK(k != nullptr, "key_with_value: no config key ", dotted);
  return dotted + " = " + format_value(k->get(cfg));
}

int64_t derived_ffn_dim(const ModelConfig& m) {
  if (m.ffn_dim > 0) return m.ffn_dim;
  const int64_t hidden = (2 * 4 * m.dim) / 3;  // int(2 * (4 * dim) / 3) as in Meta's LLaMA
  const int64_t mult = std::max<int64_t>(1, m.ffn_multiple_of);
  return mult * ((hidden + mult - 1) / mult);
}

int64_t head_dim(const ModelConfig& m) { return m.n_head > 0 ? m.dim / m.n_head : 0; }

std::vector<ShapeProblem> model_shape_problems(const Config& cfg,
                                               const std::function<std::string(const std::string&)>& describe) {
  const ModelConfig& m = cfg.model;
  const int64_t tp = cfg.parallel.tensor_parallel_size;
  const std::string tps = describe("parallel.tensor_parallel_size");
  std::vector<ShapeProblem> out;
  if (tp < 1) out.push_back({"parallel.tensor_parallel_size", tps + " must be at least 1"});
  if (m.n_head < 1 || m.n_kv_head < 1 || m.dim < 1 || m.n_layer < 1 || m.vocab_size < 1) {
    out.push_back({"model.dim", "model.dim, n_layer, n_head, n_kv_head and vocab_size must be positive"});
    return out;
  }
  if (m.dim % m.n_head != 0)
    out.push_back({"model.dim", describe("model.dim") + " is not divisible by " + describe("model.n_head") +
                                    ": the head size must be a whole number"});
  if (head_dim(m) % 2 != 0)
    out.push_back({"model.dim", "head size " + describe("model.dim") + " / n_head = " + std::to_string(head_dim(m)) +
                                    " is odd: rotary embeddings need an even head size"});
  if (m.n_kv_head > m.n_head || m.n_head % m.n_kv_head != 0)
    out.push_back({"model.n_head", describe("model.n_head") + " is not a multiple of " + describe("model.n_kv_head") +
                                       ": each key/value head must serve a whole group of query heads"});
  if (tp < 1) return out;
  if (m.n_head % tp != 0)
    out.push_back({"model.n_head", describe("model.n_head") + " is not divisible by " + tps +
                                       ": each tensor-parallel rank must hold whole heads"});
  if (m.n_kv_head % tp != 0)
    out.push_back({"model.n_kv_head", describe("model.n_kv_head") + " is not divisible by " + tps +
                                          ": each tensor-parallel rank must hold whole key/value heads"});
  if (derived_ffn_dim(m) % tp != 0) {
    if (m.ffn_dim > 0)
      out.push_back({"model.ffn_dim", describe("model.ffn_dim") + " is not divisible by " + tps +
                                          ": MLP columns are split evenly"});
    else
      out.push_back({"model.ffn_multiple_of", "the derived ffn_dim = " + std::to_string(derived_ffn_dim(m)) + " (from " +
                                                  describe("model.dim") + " and " + describe("model.ffn_multiple_of") +
                                                  ") is not divisible by " + tps + ": MLP columns are split evenly"});
  }
  return out;
}

std::string config_to_toml(const Config& cfg) {
  std::ostringstream os;
  os << "# Effective AndyLLM configuration (defaults < file < command line).\n";
  std::string section;
  for (const auto& k : config_schema()) {
    if (k.section != section) {
      section = k.section;
      os << "\n[" << section << "]\n";
    }
    std::string line = k.key + " = " + format_value(k.get(cfg));
    os << line;
    if (line.size() < 40) os << std::string(40 - line.size(), ' ');
    os << "  # " << cfg.origin_of(k.dotted()) << "\n";
  }
  return os.str();
}

std::string config_schema_help() {
  Config defaults;
  std::ostringstream os;
  std::string section;
  for (const auto& k : config_schema()) {
    if (k.section != section) {
      section = k.section;
      os << "\n[" << section << "]\n";
    }
    os << "  " << k.key << " (" << k.type_name() << ", default " << format_value(k.get(defaults));
    std::string r = k.range_text();
    if (!r.empty() && k.type != ValueType::kBool) os << ", " << r;
    os << ")\n      " << k.description << "\n";
  }
  return os.str();
}

}  // namespace andy
