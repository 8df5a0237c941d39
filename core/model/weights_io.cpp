// Weights I/O (see weights_io.h).
#include "core/model/weights_io.h"

#include <torch/serialize.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <nlohmann/json.hpp>

#include "core/base/durable_fs.h"
#include "core/base/error.h"
#include "core/model/hf_checkpoint.h"
#include "core/model/int8_weights.h"
#include "core/model/llama.h"
#include "core/model/model_config.h"
#include "core/model/safetensors.h"

namespace andy {

namespace fs = std::filesystem;

at::Tensor read_archive_tensor(torch::serialize::InputArchive& ar, const std::string& file, const std::string& name,
                               const std::string& what) {
  at::Tensor t;
  bool ok = false;
  try {
    ok = ar.try_read(archive_key(name), t);
  } catch (const c10::Error&) {
    ok = false;
  }
  ANDY_CHECK_T(IoError, ok && t.defined(), what, " ", file, ": tensor '", name,
               "' is missing (damaged, or a model of another architecture)");
  return t;
}

StateDict read_checkpoint_weights(const std::string& dir, int tp_rank,
                                  const std::map<std::string, std::vector<int64_t>>& expected) {
  const std::string weights_file = dir + "/" + checkpoint_weights_file(tp_rank);
  const bool apart = fs::exists(weights_file);  // format 3
  const std::string file = apart ? weights_file : dir + "/" + checkpoint_shard_file(tp_rank);
  std::optional<SafetensorsFile> st;
  std::optional<torch::serialize::InputArchive> ar;
  if (apart)
    st = SafetensorsFile::open(file);
  else
    ar = open_archive(file, "checkpoint file");
  StateDict out;
  for (const auto& [name, shape] : expected) {
    at::Tensor t;
    if (apart) {
      ANDY_CHECK_T(IoError, st->contains(name), "checkpoint file ", file, ": tensor '", name,
                   "' is missing (damaged, or a model of another architecture)");
      t = st->tensor(name);  // a view on the mapping: copied once, by whoever uses it
    } else {
      t = read_archive_tensor(*ar, file, name, "checkpoint file");
    }
    ANDY_CHECK_T(IoError, shape.empty() || t.sizes() == at::IntArrayRef(shape), "checkpoint file ", file, ": '",
                 name, "' has shape ", t.sizes(), ", the model expects ", at::IntArrayRef(shape),
                 " (another model config?)");
    out[name] = t;
  }
  return out;
}

torch::serialize::InputArchive open_archive(const std::string& file, const std::string& what) {
  ANDY_CHECK_T(IoError, fs::exists(file), what, " ", file, " is missing (partial or damaged?)");
  torch::serialize::InputArchive ar;
  try {
    ar.load_from(file);
  } catch (const c10::Error& e) {
    std::string text = e.what_without_backtrace();
    ANDY_THROW(IoError, what, " ", file, " cannot be read (truncated or damaged): ", text.substr(0, 200));
  }
  return ar;
}

std::string checkpoint_shard_file(int tp_rank) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "shard_tp%02d.pt", tp_rank);
  return buf;
}

std::string checkpoint_weights_file(int tp_rank) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "model_tp%02d.safetensors", tp_rank);
  return buf;
}

std::string archive_key(const std::string& tensor_name) {
  std::string k = tensor_name;
  std::replace(k.begin(), k.end(), '.', '/');
  return k;
}

namespace {

Config saved_config(const std::string& text, const std::string& source) {
  Config c;
  apply_toml_sections(c, text, source, {"model", "data"});
  return c;
}


torch::serialize::InputArchive open_weights(const std::string& file) { return open_archive(file, "model weights"); }

at::Tensor read_weight(torch::serialize::InputArchive& ar, const std::string& file,
                       const std::string& name) {
  return read_archive_tensor(ar, file, name, "model weights");
}

std::map<std::string, std::vector<int64_t>> full_shapes(const ModelConfig& m) {
  std::map<std::string, std::vector<int64_t>> s;
  for (auto& [name, shape] : model_tensor_shapes(m)) s[name] = shape;
  return s;
}

void check_shape(const at::Tensor& t, const std::vector<int64_t>& expected, const std::string& file,
                 const std::string& name) {
  ANDY_CHECK_T(IoError, t.sizes() == at::IntArrayRef(expected), "model weights ", file, ": '", name,
               "' has shape ", t.sizes(), ", the saved config implies ", at::IntArrayRef(expected),
               " (weights and config.toml of different models?)");
}

StateDict read_full_weights(const ModelSource& src) {
  auto ar = open_weights(src.weights_file);
  StateDict full;
  for (const auto& [name, shape] : full_shapes(src.config.model)) {
    full[name] = read_weight(ar, src.weights_file, name);
    check_shape(full[name], shape, src.weights_file, name);
    if (!src.int8 || !is_int8_linear(name)) continue;
    ANDY_CHECK_T(IoError, full[name].scalar_type() == at::kChar, "model weights ", src.weights_file,
                 ": '", name, "' is ", c10::toString(full[name].scalar_type()), " but ",
                 kQuantizationFile, " marks the model as int8");
    const std::string scale = name + kInt8ScaleSuffix;
    full[scale] = read_weight(ar, src.weights_file, scale);
    check_shape(full[scale], {shape[0]}, src.weights_file, scale);
  }
  return full;
}

// The weights of rank r's shard of a checkpoint written at tp = saved_tp, as stored (padded).
StateDict read_checkpoint_shard(const ModelSource& src, int r, const PartitionSpecs& specs) {
  ANDY_CHECK_T(IoError, fs::exists(src.dir + "/" + checkpoint_weights_file(r)) ||
                            fs::exists(src.dir + "/" + checkpoint_shard_file(r)),
               "checkpoint ", src.dir, ": ", checkpoint_weights_file(r), " and ", checkpoint_shard_file(r),
               " are missing (meta.json says tp_size ", src.saved_tp, "; partial checkpoint?)");
  std::map<std::string, std::vector<int64_t>> names;  // shapes are checked by the caller
  for (const auto& [name, spec] : specs) names[name] = {};
  return read_checkpoint_weights(src.dir, r, names);
}

// Rank tp_rank's slices of a Hugging Face directory's weights, in fp32. Each tensor is a view
// on the mapped file until it is split, so a rank reads only its own rows.
StateDict read_hf_shard(const ModelSource& src, const PartitionSpecs& specs, int tp_rank, int tp_size) {
  std::map<std::string, at::Tensor> stored = read_safetensors_dir(src.dir);
  const ModelConfig& m = src.config.model;
  const auto shapes = full_shapes(m);
  for (const auto& [name, t] : stored) {
    const bool ignorable = name.find("rotary_emb.inv_freq") != std::string::npos ||
                           (m.tie_embeddings && name == "lm_head.weight");
    ANDY_CHECK_T(IoError, shapes.count(name) || ignorable, "model ", src.dir, ": tensor '", name,
                 "' is not part of a LLaMA model (another architecture?)");
  }
  StateDict mine;
  for (const auto& [name, shape] : shapes) {
    auto it = stored.find(name);
    ANDY_CHECK_T(IoError, it != stored.end(), "model ", src.dir, ": tensor '", name,
                 "' is missing from its safetensors files (damaged, or another architecture)");
    check_shape(it->second, shape, src.dir, name);
    const at::ScalarType t = it->second.scalar_type();
    ANDY_CHECK_T(IoError, t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "model ", src.dir,
                 ": tensor '", name, "' is ", c10::toString(t), "; float32, bfloat16 or float16 expected");
    mine[name] = shard_tensor(it->second, specs.at(name), tp_rank, tp_size).to(at::kFloat);
  }
  return mine;
}

}  // namespace

std::vector<std::pair<std::string, std::vector<int64_t>>> model_tensor_shapes(const ModelConfig& m) {
  const int64_t d = head_dim(m), ffn = derived_ffn_dim(m);
  std::vector<std::pair<std::string, std::vector<int64_t>>> s;
  s.push_back({"model.embed_tokens.weight", {m.vocab_size, m.dim}});
  for (int64_t l = 0; l < m.n_layer; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    s.push_back({p + "input_layernorm.weight", {m.dim}});
    s.push_back({p + "self_attn.q_proj.weight", {m.n_head * d, m.dim}});
    s.push_back({p + "self_attn.k_proj.weight", {m.n_kv_head * d, m.dim}});
    s.push_back({p + "self_attn.v_proj.weight", {m.n_kv_head * d, m.dim}});
    s.push_back({p + "self_attn.o_proj.weight", {m.dim, m.n_head * d}});
    s.push_back({p + "post_attention_layernorm.weight", {m.dim}});
    s.push_back({p + "mlp.gate_proj.weight", {ffn, m.dim}});
    s.push_back({p + "mlp.up_proj.weight", {ffn, m.dim}});
    s.push_back({p + "mlp.down_proj.weight", {m.dim, ffn}});
  }
  s.push_back({"model.norm.weight", {m.dim}});
  if (!m.tie_embeddings) s.push_back({"lm_head.weight", {m.vocab_size, m.dim}});
  return s;
}

ModelSource resolve_model_source(const std::string& path) {
  ModelSource src;
  src.path = path;
  ANDY_USER_CHECK(!path.empty(), "no model given: pass --model DIR (a best_model/ "
               "directory, its model.pt, or a checkpoint step directory)");
  ANDY_USER_CHECK(fs::exists(path), "--model ", path, ": no such file or directory");
  if (fs::is_directory(path) && fs::exists(path + "/config.json") && has_safetensors(path)) {
    src.kind = ModelSource::Kind::kHuggingFace;
    src.dir = path;
    src.config_file = path + "/config.json";
    src.config.model = model_config_from_hf_json(read_text_file(src.config_file), src.config_file);
    const std::string tok = path + "/tokenizer.model";
    src.config.data.tokenizer_path = fs::exists(tok) ? tok : "";
    return src;
  }
  if (fs::is_regular_file(path)) {
    src.weights_file = path;
    src.dir = fs::path(path).parent_path().string();
    if (src.dir.empty()) src.dir = ".";
  } else if (fs::exists(path + "/model.pt")) {
    src.weights_file = path + "/model.pt";
    src.dir = path;
  } else if (fs::exists(path + "/meta.json")) {
    src.kind = ModelSource::Kind::kCheckpoint;
    src.dir = path;
  } else {
    throw ConfigError(detail::concat("--model ", path, ": neither a best_model directory (model.pt + "
               "config.toml), a checkpoint step directory (meta.json + shard_tpRR.pt) nor a Hugging "
               "Face model directory (config.json + model.safetensors)"));
  }
  if (src.kind == ModelSource::Kind::kFullWeights) {
    src.config_file = src.dir + "/config.toml";
    ANDY_CHECK_T(IoError, fs::exists(src.config_file), "--model ", path, ": ", src.config_file,
                 " is missing (the model's shapes and tokenizer are read from it)");
    src.config = saved_config(read_text_file(src.config_file), src.config_file);
    src.int8 = fs::exists(src.dir + "/" + kQuantizationFile);
    // A tokenizer copied beside the weights (quantize and export write one) is the model's.
    if (fs::exists(src.dir + "/tokenizer.model")) src.config.data.tokenizer_path = src.dir + "/tokenizer.model";
    return src;
  }
  src.config_file = src.dir + "/meta.json";
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(read_text_file(src.config_file));
    src.saved_tp = meta.at("tp_size").get<int>();
    src.config = saved_config(meta.at("config").get<std::string>(), src.config_file + " (config)");
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    ANDY_THROW(IoError, "checkpoint file ", src.config_file, " is damaged or from an older "
               "version (tp_size and config expected): ", e.what());
  }
  return src;
}

StateDict load_model_shard(const ModelSource& src, int tp_rank, int tp_size) {
  const ModelConfig& m = src.config.model;
  PartitionSpecs specs = llama_partition_specs(m, tp_size);  // ConfigError for a bad tp_size
  if (src.int8) specs = with_int8_scales(specs);
  if (src.kind == ModelSource::Kind::kFullWeights)
    return split_state_dict(read_full_weights(src), specs, tp_rank, tp_size);
  if (src.kind == ModelSource::Kind::kHuggingFace) return read_hf_shard(src, specs, tp_rank, tp_size);
  PartitionSpecs saved_specs = llama_partition_specs(m, src.saved_tp);
  if (src.saved_tp == tp_size) {
    StateDict mine = read_checkpoint_shard(src, tp_rank, saved_specs);
    // Same layout: the stored slice is this rank's; check it against a split of the shapes.
    const auto shapes = full_shapes(m);
    for (auto& [name, t] : mine) {
      std::vector<int64_t> expected = shapes.at(name);
      const PartitionSpec& sp = specs.at(name);
      if (!sp.replicated()) expected[sp.dim] = sp.padded_size / tp_size;
      check_shape(t, expected, src.dir, name);
    }
    return mine;
  }
  std::vector<StateDict> shards;
  for (int r = 0; r < src.saved_tp; ++r) shards.push_back(read_checkpoint_shard(src, r, saved_specs));
  StateDict full;
  try {
    full = merge_state_dicts(shards, saved_specs);
  } catch (const Error& e) {
    ANDY_THROW(IoError, "checkpoint ", src.dir, ": cannot merge its ", src.saved_tp,
               " TP shards: ", e.what());
  }
  for (const auto& [name, shape] : full_shapes(m)) check_shape(full.at(name), shape, src.dir, name);
  return split_state_dict(full, specs, tp_rank, tp_size);
}

StateDict load_full_state_dict(const ModelSource& src) {
  PartitionSpecs specs = llama_partition_specs(src.config.model, 1);
  if (src.int8) specs = with_int8_scales(specs);
  return merge_state_dicts({load_model_shard(src, 0, 1)}, specs);  // drops the vocabulary padding
}

void write_full_weights(const StateDict& full, const std::string& file) {
  torch::serialize::OutputArchive ar;
  for (const auto& [name, t] : full) ar.write(archive_key(name), t.detach().cpu());
  save_archive(ar, file);
}

std::string save_archive(torch::serialize::OutputArchive& archive, const std::string& file) {
  DurableWriter out(file);
  uint64_t fnv = 14695981039346656037ULL;  // FNV-1a 64 of the bytes written
  // Every chunk is reported as written, even after a failure: LibTorch's zip writer must not
  // throw (its destructor would throw again and terminate); the failure is ours to report.
  archive.save_to([&](const void* data, size_t n) -> size_t {
    const char* p = static_cast<const char*>(data);
    for (size_t i = 0; i < n; ++i) fnv = (fnv ^ static_cast<unsigned char>(p[i])) * 1099511628211ULL;
    out.write(data, n);
    return n;
  });
  out.finish();  // names the file itself on failure
  char hex[32];
  std::snprintf(hex, sizeof hex, "fnv1a64:%016llx", static_cast<unsigned long long>(fnv));
  return hex;
}

}  // namespace andy
