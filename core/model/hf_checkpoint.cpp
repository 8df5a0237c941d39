// Hugging Face config.json and model directory (see hf_checkpoint.h).
#include "core/model/hf_checkpoint.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/base/dtype_names.h"
#include "core/base/durable_fs.h"
#include "core/base/error.h"
#include "core/model/model_config.h"
#include "core/model/safetensors.h"
#include "core/model/weights_io.h"

namespace andy {

namespace fs = std::filesystem;
using json = nlohmann::json;

at::ScalarType hf_dtype(const std::string& name, const std::string& what) {
  const auto t = scalar_type_named(name);
  if (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) return *t;
  ANDY_THROW(ConfigError, what, " '", name, "': expected float32, bfloat16 or float16");
}

std::string hf_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: ANDY_THROW(Error, "hf_dtype_name: no Hugging Face name for ", c10::toString(t));
  }
}

std::string hf_config_json(const ModelConfig& m, at::ScalarType dtype, const SpecialIds& ids) {
  json c = json::object();
  c["architectures"] = {"LlamaForCausalLM"};
  c["model_type"] = "llama";
  c["hidden_size"] = m.dim;
  c["intermediate_size"] = derived_ffn_dim(m);
  c["num_hidden_layers"] = m.n_layer;
  c["num_attention_heads"] = m.n_head;
  c["num_key_value_heads"] = m.n_kv_head;
  c["head_dim"] = head_dim(m);
  c["hidden_act"] = "silu";
  c["max_position_embeddings"] = m.max_seq_len;
  c["rms_norm_eps"] = m.norm_eps;
  c["rope_theta"] = m.rope_theta;
  c["rope_scaling"] = nullptr;
  c["vocab_size"] = m.vocab_size;
  c["tie_word_embeddings"] = m.tie_embeddings;
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["mlp_bias"] = false;
  c["initializer_range"] = m.init_std;
  c["pretraining_tp"] = 1;
  c["use_cache"] = true;
  c["torch_dtype"] = hf_dtype_name(dtype);
  c["bos_token_id"] = ids.bos;
  c["eos_token_id"] = ids.eos;
  c["pad_token_id"] = ids.pad;
  return c.dump(2) + "\n";
}

namespace {

// A required integer field of config.json.
int64_t required_int(const json& c, const char* key, const std::string& file) {
  ANDY_CHECK_T(ConfigError, c.contains(key) && c[key].is_number_integer(), file, ": field '", key,
               "' is missing or not an integer (a LLaMA config.json has it)");
  return c[key].get<int64_t>();
}

// ConfigError unless `c[key]` is absent, null, or `ok(value)`.
template <typename Ok>
void require(const json& c, const char* key, Ok ok, const std::string& file, const std::string& expected) {
  if (!c.contains(key) || c[key].is_null()) return;
  ANDY_CHECK_T(ConfigError, ok(c[key]), file, ": field '", key, "' is ", c[key].dump(), "; AndyLLM runs ",
               expected);
}

}  // namespace

ModelConfig model_config_from_hf_json(const std::string& text, const std::string& file) {
  json c;
  try {
    c = json::parse(text);
  } catch (const std::exception& e) {
    ANDY_THROW(IoError, file, " is not valid JSON: ", e.what());
  }
  ANDY_CHECK_T(ConfigError, c.is_object(), file, " is not a JSON object");
  const std::string type = c.value("model_type", "");
  ANDY_CHECK_T(ConfigError, type == "llama", file, ": model_type '", type,
               "' is not supported (AndyLLM runs the LLaMA architecture: model_type \"llama\", "
               "LlamaForCausalLM)");
  require(c, "hidden_act", [](const json& v) { return v == "silu"; }, file, "hidden_act \"silu\" only");
  require(c, "rope_scaling", [](const json&) { return false; }, file, "plain RoPE only (rope_scaling null)");
  require(c, "attention_bias", [](const json& v) { return v == false; }, file, "attention without bias only");
  require(c, "mlp_bias", [](const json& v) { return v == false; }, file, "MLP without bias only");
  ModelConfig m;
  m.dim = required_int(c, "hidden_size", file);
  m.n_layer = required_int(c, "num_hidden_layers", file);
  m.n_head = required_int(c, "num_attention_heads", file);
  m.n_kv_head = c.contains("num_key_value_heads") && !c["num_key_value_heads"].is_null()
                    ? required_int(c, "num_key_value_heads", file) : m.n_head;
  m.ffn_dim = required_int(c, "intermediate_size", file);
  m.vocab_size = required_int(c, "vocab_size", file);
  m.max_seq_len = c.contains("max_position_embeddings") ? required_int(c, "max_position_embeddings", file) : 2048;
  m.norm_eps = c.value("rms_norm_eps", 1e-6);
  m.rope_theta = c.value("rope_theta", 10000.0);
  if (c.contains("rope_parameters") && c["rope_parameters"].is_object()) {  // transformers 5
    const json& rp = c["rope_parameters"];
    const std::string rope_type = rp.value("rope_type", "default");
    ANDY_CHECK_T(ConfigError, rope_type == "default", file, ": rope_parameters.rope_type '", rope_type,
                 "'; AndyLLM runs plain RoPE only (\"default\")");
    m.rope_theta = rp.value("rope_theta", m.rope_theta);
  }
  m.tie_embeddings = c.value("tie_word_embeddings", false);  // LlamaConfig's default
  m.init_std = c.value("initializer_range", 0.02);
  ANDY_CHECK_T(ConfigError, m.n_head > 0 && m.dim % m.n_head == 0, file, ": hidden_size ", m.dim,
               " is not a multiple of num_attention_heads ", m.n_head);
  require(c, "head_dim", [&](const json& v) { return v.is_number_integer() && v.get<int64_t>() == m.dim / m.n_head; },
          file, "head_dim = hidden_size / num_attention_heads only");
  validate_model_shapes(m, 1);
  return m;
}

void write_hf_model(const StateDict& full, const ModelConfig& m, at::ScalarType dtype,
                    const std::string& dir, uint64_t max_shard_bytes, const SpecialIds& ids) {
  NamedTensors tensors;
  for (const auto& [name, shape] : model_tensor_shapes(m)) {
    auto it = full.find(name);
    ANDY_CHECK(it != full.end(), "write_hf_model: the state dict lacks '", name, "'");
    ANDY_CHECK(it->second.sizes() == at::IntArrayRef(shape), "write_hf_model: '", name, "' has shape ",
               it->second.sizes(), ", the config implies ", at::IntArrayRef(shape));
    tensors.emplace_back(name, it->second.detach().to(at::kCPU, dtype).contiguous());
  }
  write_safetensors_dir(tensors, dir, max_shard_bytes);
  const fs::path d(dir);
  write_file_durable((d / "config.json").string(), hf_config_json(m, dtype, ids));
  json gen = {{"_from_model_config", true}, {"bos_token_id", ids.bos}, {"eos_token_id", ids.eos},
              {"pad_token_id", ids.pad}};
  write_file_durable((d / "generation_config.json").string(), gen.dump(2) + "\n");
}

}  // namespace andy
