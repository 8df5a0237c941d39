// What `generate`, `bench generate` and `serve` share: the model named by [serve] model loaded
// onto the ranks (tensor parallel over the whole world: one engine per job), the tokenizer on
// rank 0, and the engine. Setup failures (a missing or damaged model, a TP size that does not
// divide the heads, a tokenizer of another vocabulary) are agreed across ranks: one message,
// one exit code (2 for bad input), nothing written.
//
//   ServingStack stack = build_serving_stack(cfg, world);
//   if (world->is_root()) { ... stack.engine->submit(...); stack.engine->run_until_idle();
//                           stack.engine->shutdown_workers(); }
//   else stack.engine->run_worker();
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/config/config.h"
#include "core/model/llama.h"
#include "core/model/weights_io.h"
#include "data/tokenizer.h"
#include "launch/cli.h"
#include "parallel/process_grid.h"
#include "parallel/world.h"
#include "serve/engine.h"

namespace andy {

struct ServingStack {
  ModelSource source;
  ModelConfig model_config;
  std::string tokenizer_path;
  std::optional<data::Tokenizer> tokenizer;  // rank 0 only
  std::unique_ptr<ProcessGrid> grid;
  LlamaForCausalLM model{nullptr};
  std::unique_ptr<serve::ControlChannel> channel;
  std::unique_ptr<serve::Engine> engine;
  at::Device device{at::kCPU};
  double load_seconds = 0;
};

// Collective over the world. `cfg.serve.model` names the model.
ServingStack build_serving_stack(const Config& cfg, World* world);

// This rank's shard of the model `src` (an int8 model on its int8 path) on the grid's TP group,
// moved to `device` and cast to `dtype` (fp32 keeps the stored weights), in eval mode. Reads
// files only; no collective.
LlamaForCausalLM load_model_for_inference(const ModelSource& src, const ProcessGrid& grid, at::Device device,
                                          at::ScalarType dtype = at::kFloat);

// serve.dtype as a LibTorch dtype: auto and fp32 -> kFloat, bf16, fp16. ConfigError (naming the
// key and where it was set) for fp16 on CPU, whose matrix products LibTorch 1.13 lacks, and for
// bf16 / fp16 with an int8 model.
at::ScalarType serve_dtype(const Config& cfg, bool int8_model);

// The serving flags shared by generate / bench generate / serve (each sets a [serve] key).
std::vector<Flag> serving_flags();
// Copies the serving flags given on the command line into --set serve.KEY=VALUE entries; a
// command's own flags (flag -> [serve] key) in `extra_keys` too.
using ServeKeyTable = std::vector<std::pair<std::string, std::string>>;
ParsedArgs with_serving_flags(const ParsedArgs& args, const ServeKeyTable& extra_keys = {});

// Sampling flags of `generate` (--temperature, --top_p, ...) into params.
serve::SamplingParams sampling_from_flags(const ParsedArgs& args, int64_t max_tokens_default);
std::vector<Flag> sampling_flags();

// The tokenizer the user names (`given`, a --tokenizer_path) or else the model's own (a
// tokenizer.model beside it, or its saved config's data.tokenizer_path). ConfigError saying
// what to pass when neither exists.
std::string tokenizer_path_for(const std::string& given, const ModelSource& src);

// True when `s` is valid UTF-8.
bool is_valid_utf8(const std::string& s);

}  // namespace andy
