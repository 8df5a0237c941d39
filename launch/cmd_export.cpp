// `andyllm export`: a model (best_model/, a checkpoint at any TP size, an int8 directory or a
// Hugging Face directory) as a Hugging Face directory for transformers / vLLM (--format hf) or
// as one GGUF file for llama.cpp (--format gguf). Accepts the seed's convert_to_vllm.py flags
// (--model_path, --output_dir, --tokenizer_path).
// Convention: nothing appears at the output path until it is complete: the directory or file
// is built under "<output>.partial-<pid>" and renamed into place; an existing output is
// replaced only with --overwrite.
#include <filesystem>

#include "core/base/durable_fs.h"
#include "core/base/format.h"
#include "core/base/logging.h"
#include "core/model/gguf_llama.h"
#include "core/model/hf_checkpoint.h"
#include "core/model/int8_weights.h"
#include "core/model/weights_io.h"
#include "data/hf_tokenizer.h"
#include "data/sp_vocab.h"
#include "launch/commands.h"
#include "launch/serving.h"

namespace andy {

namespace {

namespace fs = std::filesystem;

constexpr uint64_t kDefaultMaxShardBytes = 5'000'000'000ull;  // transformers' "5GB"

struct ExportOptions {
  std::string format;  // "hf" | "gguf"
  std::string model;
  std::string output;
  std::string tokenizer;  // "" = the model's own
  std::string dtype;      // hf: float32|bfloat16|float16; gguf: f32|f16|q8_0
  uint64_t max_shard_bytes = kDefaultMaxShardBytes;
  std::string name;       // GGUF general.name
  bool overwrite = false;
};

// "5GB", "500MB", "2GiB", "123" (bytes) -> bytes, as transformers' max_shard_size.
uint64_t parse_size(const std::string& text, const std::string& flag) {
  size_t end = 0;
  double v = 0;
  try {
    v = std::stod(text, &end);
  } catch (const std::exception&) {
    end = 0;
  }
  std::string unit = text.substr(end);
  for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  const std::vector<std::pair<std::string, double>> units = {
      {"", 1}, {"B", 1}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
      {"KIB", 1024.0}, {"MIB", 1048576.0}, {"GIB", 1073741824.0}};
  for (const auto& [u, f] : units)
    if (end > 0 && unit == u && v > 0) return static_cast<uint64_t>(v * f);
  ANDY_THROW(ConfigError, "--", flag, " '", text, "': expected a positive size such as 5GB, 500MB or 2GiB");
}

ExportOptions export_options_from(const ParsedArgs& args) {
  reject_positional(args, "export");
  ExportOptions o;
  o.format = args.get("format");
  ANDY_USER_CHECK(!o.format.empty(), "--format is required: hf (Hugging Face / vLLM) or gguf (llama.cpp)");
  ANDY_USER_CHECK(o.format == "hf" || o.format == "gguf", "--format '", o.format,
                  "': expected hf (Hugging Face / vLLM) or gguf (llama.cpp)");
  o.model = args.get_any({"model_path", "model", "input"});
  o.output = args.get_any({"output_dir", "output", "output_path"});
  ANDY_USER_CHECK(!o.model.empty(), "--model_path is required (a best_model/ directory, its model.pt, a "
                  "checkpoint step directory, an int8 or a Hugging Face directory)");
  ANDY_USER_CHECK(!o.output.empty(), "--output_dir (hf) or --output FILE (gguf) is required");
  o.tokenizer = args.get("tokenizer_path");
  o.dtype = args.get("dtype", o.format == "hf" ? "float32" : "f16");
  if (o.format == "hf")
    hf_dtype(o.dtype, "--dtype");  // ConfigError for another name
  else
    ANDY_USER_CHECK(o.dtype == "f32" || o.dtype == "f16" || o.dtype == "q8_0" || o.dtype == "bf16",
                    "--dtype '", o.dtype, "': GGUF export writes f32, f16, bf16 or q8_0");
  if (args.has("max_shard_size")) o.max_shard_bytes = parse_size(args.get("max_shard_size"), "max_shard_size");
  o.overwrite = args.has("overwrite");
  check_output_free(o.output, o.overwrite);
  fs::path model_path(o.model);
  if (model_path.filename().empty()) model_path = model_path.parent_path();  // "dir/"
  o.name = args.get("name", model_path.filename().string());
  return o;
}

// The model's full (unsharded, fp32) tensors; an int8 model is dequantized.
StateDict load_full_model(const ModelSource& src) {
  StateDict full = load_full_state_dict(src);
  return src.int8 ? dequantize_state_dict(full) : full;
}

// The tokenizer to ship, checked against the model's vocabulary.
std::string checked_tokenizer(const ExportOptions& o, const ModelSource& src, data::SpVocab* vocab) {
  const std::string path = tokenizer_path_for(o.tokenizer, src);
  *vocab = data::read_sp_vocab(path);
  ANDY_USER_CHECK(static_cast<int64_t>(vocab->pieces.size()) == src.config.model.vocab_size, "tokenizer ",
                  path, " has ", vocab->pieces.size(), " pieces but the model has vocab_size = ",
                  src.config.model.vocab_size, " (pass the tokenizer it was trained with: --tokenizer_path)");
  return path;
}

SpecialIds special_ids_of(const data::SpVocab& v) {
  SpecialIds ids;
  ids.pad = v.pad_id;
  ids.unk = v.unk_id;
  ids.bos = v.bos_id;
  ids.eos = v.eos_id;
  return ids;
}

void export_hf(const ExportOptions& o, const ModelSource& src, const StateDict& full,
               const std::string& tokenizer, const data::SpVocab& vocab, const std::string& tmp) {
  fs::create_directories(tmp);
  write_hf_model(full, src.config.model, hf_dtype(o.dtype, "--dtype"), tmp, o.max_shard_bytes,
                 special_ids_of(vocab));
  data::write_hf_tokenizer_files(tokenizer, tmp, static_cast<int>(src.config.model.max_seq_len));
  fsync_path(tmp);
}

// llama.cpp's tokenizer.ggml.* keys for a sentencepiece ("llama") vocabulary.
void add_gguf_tokenizer(GgufWriter& w, const data::SpVocab& v) {
  ANDY_USER_CHECK(v.model_type == "bpe" || v.model_type == "unigram", "GGUF export: a sentencepiece ",
                  v.model_type, " tokenizer cannot be expressed (llama.cpp's SPM vocabulary needs bpe or unigram)");
  std::vector<std::string> tokens;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (const auto& p : v.pieces) {
    tokens.push_back(p.piece);
    scores.push_back(p.score);
    types.push_back(static_cast<int32_t>(p.type));
  }
  w.add_string("tokenizer.ggml.model", "llama");
  w.add_string("tokenizer.ggml.pre", "default");
  w.add_string_array("tokenizer.ggml.tokens", tokens);
  w.add_f32_array("tokenizer.ggml.scores", scores);
  w.add_i32_array("tokenizer.ggml.token_type", types);
  if (v.bos_id >= 0) w.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(v.bos_id));
  if (v.eos_id >= 0) w.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(v.eos_id));
  if (v.unk_id >= 0) w.add_u32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(v.unk_id));
  if (v.pad_id >= 0) w.add_u32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(v.pad_id));
  // Models trained here never saw bos in front of a text, and generate / serve add none: so
  // llama.cpp must not either (data/hf_tokenizer.h says the same for Hugging Face).
  w.add_bool("tokenizer.ggml.add_bos_token", false);
  w.add_bool("tokenizer.ggml.add_eos_token", false);
  w.add_bool("tokenizer.ggml.add_space_prefix", v.add_dummy_prefix);
}

GgmlType gguf_weight_type(const std::string& dtype) {
  if (dtype == "f32") return GgmlType::kF32;
  if (dtype == "bf16") return GgmlType::kBF16;
  if (dtype == "q8_0") return GgmlType::kQ8_0;
  return GgmlType::kF16;
}

void export_gguf(const ExportOptions& o, const ModelSource& src, const StateDict& full,
                 const data::SpVocab& vocab, const std::string& tmp) {
  GgufWriter w;
  add_llama_gguf(w, full, src.config.model, gguf_weight_type(o.dtype), o.name);
  add_gguf_tokenizer(w, vocab);
  w.write(tmp);
}

int run_export(const ParsedArgs& args, World*) {
  const ExportOptions o = export_options_from(args);
  const ModelSource src = resolve_model_source(o.model);
  data::SpVocab vocab;
  const std::string tokenizer = checked_tokenizer(o, src, &vocab);
  log::info("export: reading ", o.model, src.int8 ? " (int8, dequantized)" : "");
  const StateDict full = load_full_model(src);
  build_then_publish(o.output, o.overwrite, [&](const std::string& tmp) {
    if (o.format == "hf")
      export_hf(o, src, full, tokenizer, vocab, tmp);
    else
      export_gguf(o, src, full, vocab, tmp);
  });
  uint64_t bytes = 0;
  if (fs::is_directory(o.output)) {
    for (const auto& e : fs::directory_iterator(o.output)) bytes += e.is_regular_file() ? e.file_size() : 0;
  } else {
    bytes = fs::file_size(o.output);
  }
  log::info("export: wrote ", o.output, " (", o.format, ", ", o.dtype, ", ", format_si(static_cast<double>(bytes), "B"),
            ")");
  return 0;
}

}  // namespace

Subcommand make_export_command() {
  Subcommand c;
  c.name = "export";
  c.summary = "export a model to Hugging Face (transformers, vLLM) or GGUF (llama.cpp)";
  c.usage =
      "usage: andyllm export --format hf --model_path outputs/tiny/best_model --output_dir outputs/tiny_hf\n"
      "                      [--tokenizer_path FILE] [--dtype float32|bfloat16|float16] [--max_shard_size 5GB]\n"
      "       andyllm export --format gguf --model_path outputs/tiny/best_model --output tiny.gguf\n"
      "                      [--dtype f32|f16|bf16|q8_0]\n"
      "  the model: a best_model/ directory, its model.pt, a checkpoint step directory (any TP size),\n"
      "  an int8 directory (andyllm quantize) or a Hugging Face directory";
  c.flags = {{"format", "hf|gguf", "output format"},
             {"model_path", "PATH", "the model to export"},
             {"model", "PATH", "alias of --model_path"},
             {"input", "PATH", "alias of --model_path"},
             {"output_dir", "PATH", "output directory (hf) or file (gguf)"},
             {"output", "PATH", "alias of --output_dir"},
             {"output_path", "PATH", "alias of --output_dir"},
             {"tokenizer_path", "FILE", "sentencepiece model; default: the model's own"},
             {"dtype", "TYPE", "hf: float32 (default), bfloat16, float16; gguf: f16 (default), f32, bf16, q8_0"},
             {"max_shard_size", "SIZE", "hf: largest safetensors file before sharding (default 5GB)"},
             {"name", "TEXT", "gguf: general.name (default: the model directory's name)"},
             {"overwrite", "", "replace an existing output"}};
  c.run = run_export;
  return c;
}

}  // namespace andy
