// `andyllm quantize`: dynamic int8 quantization for CPU serving (the seed's quantize.py
// --quantization_type dynamic). Every linear weight becomes int8 with one fp32 scale per output
// row; embeddings and norms stay fp32 (core/model/int8_weights.h). The output directory is
// served by `serve` / `generate` at any TP size, evaluated by `eval`, and exported by
// `export --format gguf --dtype q8_0`. It is built under "<output>.partial-<pid>" and renamed
// into place when complete.
#include <filesystem>

#include "core/base/durable_fs.h"
#include "core/base/format.h"
#include "core/base/logging.h"
#include "core/model/int8_weights.h"
#include "core/model/weights_io.h"
#include "launch/commands.h"
#include "launch/serving.h"

namespace andy {

namespace {

namespace fs = std::filesystem;

struct QuantizeOptions {
  std::string model, output, tokenizer;
  bool overwrite = false;
};

QuantizeOptions quantize_options_from(const ParsedArgs& args) {
  reject_positional(args, "quantize");
  QuantizeOptions o;
  o.model = args.get_any({"model_path", "model", "input"});
  o.output = args.get_any({"output_path", "output", "output_dir"});
  ANDY_USER_CHECK(!o.model.empty(), "--model_path is required (a best_model/ directory, its model.pt, a "
                  "checkpoint step directory or a Hugging Face directory)");
  ANDY_USER_CHECK(!o.output.empty(), "--output_path is required (the directory to write)");
  const std::string type = args.get("quantization_type", "dynamic");
  ANDY_USER_CHECK(type == "dynamic", "--quantization_type '", type,
                  "': only dynamic is supported (int8 weights, activations quantized at run time)");
  o.tokenizer = args.get("tokenizer_path");
  o.overwrite = args.has("overwrite");
  check_output_free(o.output, o.overwrite);
  return o;
}

// Bytes of the linear weights before (fp32) and after (int8 + scales).
std::pair<int64_t, int64_t> linear_bytes(const StateDict& full, const StateDict& q) {
  int64_t before = 0, after = 0;
  for (const auto& [name, t] : full)
    if (is_int8_linear(name)) {
      before += t.numel() * 4;
      after += q.at(name).numel() + q.at(name + kInt8ScaleSuffix).numel() * 4;
    }
  return {before, after};
}

void write_quantized_dir(const StateDict& q, const ModelSource& src, const std::string& tokenizer,
                         const std::string& dir) {
  fs::create_directories(dir);
  write_full_weights(q, dir + "/model.pt");
  if (!tokenizer.empty()) {
    fs::copy_file(tokenizer, dir + "/tokenizer.model", fs::copy_options::overwrite_existing);
    fsync_path(dir + "/tokenizer.model");  // preferred over data.tokenizer_path when loaded
  }
  write_file_durable(dir + "/config.toml", config_to_toml(src.config));
  write_file_durable(dir + "/" + kQuantizationFile, quantization_json());
  fsync_path(dir);
}

int run_quantize(const ParsedArgs& args, World*) {
  const QuantizeOptions o = quantize_options_from(args);
  const ModelSource src = resolve_model_source(o.model);
  ANDY_USER_CHECK(!src.int8, "--model_path ", o.model, " is already int8 (", kQuantizationFile, ")");
  std::string tokenizer;
  try {
    tokenizer = tokenizer_path_for(o.tokenizer, src);
  } catch (const ConfigError& e) {
    log::warn("quantize: no tokenizer is copied beside the weights (", e.what(),
              "); serve it with --tokenizer_path");
  }
  log::info("quantize: reading ", o.model);
  const StateDict full = load_full_state_dict(src);
  const StateDict q = quantize_state_dict(full);
  build_then_publish(o.output, o.overwrite,
                     [&](const std::string& tmp) { write_quantized_dir(q, src, tokenizer, tmp); });
  const auto [before, after] = linear_bytes(full, q);
  log::info("quantize: wrote ", o.output, ": linear weights ", format_si(static_cast<double>(before), "B"),
            " fp32 -> ", format_si(static_cast<double>(after), "B"), " int8 + scales (",
            static_cast<double>(before) / std::max<int64_t>(after, 1), "x smaller); model.pt ",
            format_si(static_cast<double>(fs::file_size(o.output + "/model.pt")), "B"));
  return 0;
}

}  // namespace

Subcommand make_quantize_command() {
  Subcommand c;
  c.name = "quantize";
  c.summary = "int8 dynamic quantization of a model for CPU serving";
  c.usage =
      "usage: andyllm quantize --model_path outputs/tiny/best_model --output_path outputs/tiny_int8\n"
      "                        [--quantization_type dynamic] [--tokenizer_path FILE]\n"
      "  serve the result with: mpirun -np TP andyllm serve --model outputs/tiny_int8";
  c.flags = {{"model_path", "PATH", "the model to quantize (best_model/, model.pt, checkpoint step, Hugging Face dir)"},
             {"model", "PATH", "alias of --model_path"},
             {"input", "PATH", "alias of --model_path"},
             {"output_path", "DIR", "the int8 model directory to write"},
             {"output", "DIR", "alias of --output_path"},
             {"output_dir", "DIR", "alias of --output_path"},
             {"quantization_type", "dynamic", "int8 weights, activations quantized at run time (the only type)"},
             {"tokenizer_path", "FILE", "tokenizer copied beside the weights; default: the model's own"},
             {"overwrite", "", "replace an existing output"}};
  c.run = run_quantize;
  return c;
}

}  // namespace andy
