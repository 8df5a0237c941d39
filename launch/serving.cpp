// Serving setup shared by generate / bench generate / serve (see serving.h).
#include "launch/serving.h"

#include <chrono>
#include <filesystem>

#include "core/base/dtype_names.h"
#include "core/base/logging.h"
#include "core/base/torch_compat.h"
#include "data/text_input.h"
#include "parallel/cpu_gemm.h"
#include "parallel/mpi_utils.h"

namespace andy {

namespace {

const std::vector<std::pair<std::string, std::string>>& serving_keys() {
  // flag -> [serve] key
  static const std::vector<std::pair<std::string, std::string>> keys = {
      {"model", "model"},
      {"tokenizer_path", "tokenizer_path"},
      {"device", "device"},
      {"block_size", "block_size"},
      {"max_num_seqs", "max_num_seqs"},
      {"max_batch_size", "max_num_seqs"},
      {"max_num_batched_tokens", "max_num_batched_tokens"},
      {"max_model_len", "max_model_len"},
      {"swap_space", "swap_space"},
      {"kv_cache_memory", "kv_cache_memory"},
      {"num_kv_blocks", "num_kv_blocks"},
      {"dtype", "dtype"},
      {"kv_cache_dtype", "kv_cache_dtype"},
  };
  return keys;
}

}  // namespace

std::string tokenizer_path_for(const std::string& given, const ModelSource& src) {
  if (!given.empty()) {
    ANDY_USER_CHECK(std::filesystem::is_regular_file(given), "--tokenizer_path ", given,
                    ": no such file (expected a sentencepiece .model)");
    return given;
  }
  const std::string& saved = src.config.data.tokenizer_path;
  ANDY_USER_CHECK(!saved.empty(), "--model ", src.path, ": its saved config (", src.config_file,
                  ") names no tokenizer; pass --tokenizer_path");
  ANDY_USER_CHECK(std::filesystem::is_regular_file(saved), "--model ", src.path, ": the tokenizer its saved config names (",
                  saved, ", data.tokenizer_path in ", src.config_file, ") does not exist here; pass --tokenizer_path");
  return saved;
}

LlamaForCausalLM load_model_for_inference(const ModelSource& src, const ProcessGrid& grid, at::Device device,
                                          at::ScalarType dtype) {
  LlamaForCausalLM model(src.config.model, grid.tp_ptr(), /*seed=*/0);
  model->load_local_state_dict(load_model_shard(src, grid.tp_rank(), grid.tp_size()));
  model->to(device);
  if (dtype != at::kFloat) {
    ANDY_CHECK(!src.int8, "load_model_for_inference: an int8 model stays as quantized (dtype ", dtype, ")");
    model->to(dtype);
  }
  model->eval();
  return model;
}

namespace {
// "fp32", "bf16", "fp16" (the values [serve] dtype keys take besides "auto").
// A [serve] dtype name the config has already checked (fp32, bf16, fp16).
at::ScalarType dtype_named(const std::string& name) { return scalar_type_named(name).value_or(at::kFloat); }
}  // namespace

at::ScalarType serve_dtype(const Config& cfg, bool int8_model) {
  const std::string& d = cfg.serve.dtype;
  if (d == "auto" || d == "fp32") return at::kFloat;
  ANDY_CHECK_T(ConfigError, !int8_model, "[serve] dtype = \"", d, "\" (", cfg.origin_of("serve.dtype"), "): ",
               cfg.serve.model, " is an int8 model (andyllm quantize), which runs as quantized; use dtype = auto");
  ANDY_CHECK_T(ConfigError, d != "fp16" || cfg.serve.device == "cuda", "[serve] dtype = \"fp16\" (",
               cfg.origin_of("serve.dtype"), "): fp16 matrix products need a GPU (LibTorch's CPU has none); "
               "use bf16 on CPU");
  return dtype_named(d);
}

std::vector<Flag> serving_flags() {
  return {
      {"model", "PATH", "best_model/ directory, its model.pt, a checkpoint step directory, an int8 directory "
                "(andyllm quantize) or a Hugging Face directory (serve.model)"},
      {"tokenizer_path", "FILE", "sentencepiece model; default: the one in the model's saved config"},
      {"device", "cpu|cuda", "where the model runs (serve.device)"},
      {"block_size", "N", "tokens per KV-cache block (serve.block_size)"},
      {"max_num_seqs", "N", "sequences per engine step (serve.max_num_seqs)"},
      {"max_batch_size", "N", "alias of --max_num_seqs"},
      {"max_num_batched_tokens", "N", "tokens per engine step (serve.max_num_batched_tokens)"},
      {"max_model_len", "N", "prompt + completion tokens at most (serve.max_model_len)"},
      {"swap_space", "GIB", "host memory for preempted KV blocks, per rank (serve.swap_space)"},
      {"kv_cache_memory", "BYTES|FRACTION", "KV-cache pool per rank (serve.kv_cache_memory)"},
      {"num_kv_blocks", "N", "exact KV-cache pool size in blocks (serve.num_kv_blocks)"},
      {"dtype", "auto|fp32|bf16|fp16", "weights and activations (serve.dtype; fp16: GPU only)"},
      {"kv_cache_dtype", "auto|fp32|bf16|fp16", "KV-cache elements (serve.kv_cache_dtype; auto: as --dtype)"},
  };
}

ParsedArgs with_serving_flags(const ParsedArgs& args, const ServeKeyTable& extra_keys) {
  ParsedArgs a = args;
  for (const auto& [flag, value] : args.ordered())
    for (const ServeKeyTable* table : {&serving_keys(), &extra_keys})
      for (const auto& [f, key] : *table)
        if (flag == f) a.append("set", "serve." + key + "=" + value);
  return a;
}

std::vector<Flag> sampling_flags() {
  return {
      {"max_tokens", "N", "tokens to generate per completion (default: serve.max_tokens_default)"},
      {"temperature", "T", "0: greedy; default 1"},
      {"top_p", "P", "nucleus sampling mass (default 1)"},
      {"top_k", "K", "keep the K most likely tokens (default 0: off)"},
      {"min_p", "P", "drop tokens below P x the top probability (default 0)"},
      {"seed", "N", "per-request seed (default: serve.seed mixed with the request number)"},
      {"n", "N", "completions per prompt (default 1)"},
      {"logprobs", "K", "return each token's logprob and the K most likely alternatives"},
      {"presence_penalty", "X", "OpenAI presence penalty (default 0)"},
      {"frequency_penalty", "X", "OpenAI frequency penalty (default 0)"},
      {"repetition_penalty", "X", "Hugging Face repetition penalty (default 1)"},
      {"ignore_eos", "", "keep generating after the end-of-sequence token"},
  };
}

serve::SamplingParams sampling_from_flags(const ParsedArgs& args, int64_t max_tokens_default) {
  serve::SamplingParams p;
  p.max_tokens = args.get_int("max_tokens", max_tokens_default);
  p.temperature = args.get_double("temperature", 1.0);
  p.top_p = args.get_double("top_p", 1.0);
  p.top_k = args.get_int("top_k", 0);
  p.min_p = args.get_double("min_p", 0.0);
  p.seed = args.get_int("seed", -1);
  p.n = args.get_int("n", 1);
  p.logprobs = args.get_int("logprobs", -1);
  p.presence_penalty = args.get_double("presence_penalty", 0.0);
  p.frequency_penalty = args.get_double("frequency_penalty", 0.0);
  p.repetition_penalty = args.get_double("repetition_penalty", 1.0);
  p.ignore_eos = args.has("ignore_eos");
  return p;
}

bool is_valid_utf8(const std::string& s) {
  std::string copy = s;
  return data::sanitize_utf8(&copy) == 0;
}

ServingStack build_serving_stack(const Config& cfg, World* world) {
  auto t0 = std::chrono::steady_clock::now();
  ServingStack st;
  MPI_Comm comm = world->comm().get();
  const int tp = world->size();
  // 1. The model's files and saved config; the TP size must divide its heads.
  run_agreed(comm, [&] {
    st.source = resolve_model_source(cfg.serve.model);
    st.model_config = st.source.config.model;
    try {
      llama_partition_specs(st.model_config, tp);
    } catch (const ConfigError& e) {
      throw ConfigError("cannot serve " + cfg.serve.model + " on " + std::to_string(tp) +
                        " tensor-parallel ranks (mpirun -np " + std::to_string(tp) + "): " + e.what());
    }
    st.tokenizer_path = tokenizer_path_for(cfg.serve.tokenizer_path, st.source);
    ANDY_USER_CHECK(!st.source.int8 || cfg.serve.device != "cuda", "--model ", cfg.serve.model,
                    " is an int8 model (andyllm quantize), which runs on CPU only; use --device cpu");
    if (cfg.serve.device == "cuda")
      ANDY_USER_CHECK(compat::cuda_device_count() > 0, "[serve] device = \"cuda\" (",
                   cfg.origin_of("serve.device"), "): no GPU is visible to this LibTorch; use --device cpu");
  });
  // 2. The tokenizer (rank 0), which must have the model's vocabulary.
  run_agreed(comm, [&] {
    if (!world->is_root()) return;
    st.tokenizer = data::Tokenizer::load(st.tokenizer_path);
    ANDY_USER_CHECK(st.tokenizer->vocab_size() == st.model_config.vocab_size, "tokenizer ",
                 st.tokenizer_path, " has ", st.tokenizer->vocab_size(), " pieces but the model ",
                 cfg.serve.model, " has vocab_size = ", st.model_config.vocab_size,
                 " (another tokenizer? pass the one it was trained with: --tokenizer_path)");
  });
  // 3. The rank grid (tensor parallel over the world) and this rank's slices of the weights.
  const bool cuda = cfg.serve.device == "cuda";
  const GridOptions g = grid_options_from(cfg, cfg.serve.device, "[serve] device", tp, world);
  st.grid = std::make_unique<ProcessGrid>(*world, g);
  st.device = cuda ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(std::max(0, g.device)))
                   : at::Device(at::kCPU);
  at::ScalarType dtype = at::kFloat;
  run_agreed(comm, [&] {
    dtype = serve_dtype(cfg, st.source.int8);
    st.model = load_model_for_inference(st.source, *st.grid, st.device, dtype);
  });
  // Packed on first use by the engine thread (cpu_gemm.h); the engine is this process's only model.
  set_cpu_packed_weights(!cuda && cfg.serve.cpu_packed_weights);
  // 4. The engine: KV pool from [serve], control channel for the step plans.
  serve::EngineOptions opts;
  const at::ScalarType kv_dtype =
      cfg.serve.kv_cache_dtype == "auto" ? dtype : dtype_named(cfg.serve.kv_cache_dtype);
  run_agreed(comm, [&] {
    opts = serve::engine_options_from(cfg, st.model_config, tp, st.device, kv_dtype);
    if (st.tokenizer) opts.eos_id = st.tokenizer->eos_id();
  });
  st.channel = std::make_unique<serve::ControlChannel>(comm);
  st.engine = std::make_unique<serve::Engine>(
      opts, st.model, at::TensorOptions().dtype(kv_dtype).device(st.device), st.channel.get());
  st.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (world->is_root())
    log::info("serving ", cfg.serve.model, " (", st.model_config.n_layer, " layers, dim ",
              st.model_config.dim, ", vocab ", st.model_config.vocab_size, ") on ", tp,
              " tensor-parallel rank(s), ", st.device.str(), "; KV cache ", opts.num_blocks,
              " blocks of ", opts.block_size, " tokens per rank (", c10::toString(kv_dtype), "); weights ", c10::toString(dtype),
              opts.num_host_blocks > 0 ? ", swap " + std::to_string(opts.num_host_blocks) + " blocks" : "",
              "; max_model_len ", opts.max_model_len, "; loaded in ", st.load_seconds, " s");
  return st;
}

}  // namespace andy
