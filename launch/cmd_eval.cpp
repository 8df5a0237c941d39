// `andyllm eval`: the loss and perplexity of any model (best_model/, a checkpoint, an int8 or a
// Hugging Face directory) on any split of preprocessed shards, tensor parallel over the ranks
// (mpirun -np TP). Every window of seq_len + 1 tokens of the split is scored in order (the
// trainer's validation windows), or the first --max_batches batches of them; the result is one
// JSON line on standard output: {"loss", "perplexity", "tokens", "batches", ...}.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "core/base/logging.h"
#include "core/model/weights_io.h"
#include "data/checksum.h"
#include "data/loader.h"
#include "launch/commands.h"
#include "launch/serving.h"
#include "parallel/mpi_utils.h"

namespace andy {

namespace {

struct EvalOptions {
  std::string model, split, tokenizer, device;
  int64_t seq_len = 0;  // 0: the model's saved data.seq_len (at most its max_seq_len)
  int64_t batch_size = 4;
  int64_t max_batches = 0;  // 0: every window
};

EvalOptions eval_options_from(const ParsedArgs& args) {
  reject_positional(args, "eval");
  EvalOptions o;
  o.model = args.get_any({"model_path", "model"});
  o.split = args.get_any({"val_file", "split", "data"});
  ANDY_USER_CHECK(!o.model.empty(), "--model_path is required");
  ANDY_USER_CHECK(!o.split.empty(), "--val_file is required (a split directory written by andyllm preprocess, "
                  "e.g. data/demo/processed/validation, a glob of .h5 shards or one .h5 file)");
  o.tokenizer = args.get("tokenizer_path");
  o.device = args.get("device", "cpu");
  ANDY_USER_CHECK(o.device == "cpu" || o.device == "cuda", "--device '", o.device, "': expected cpu or cuda");
  o.seq_len = args.get_int("seq_len", 0);
  o.batch_size = args.get_int("batch_size", 4);
  o.max_batches = args.get_int("max_batches", 0);
  ANDY_USER_CHECK(o.seq_len >= 0 && o.batch_size >= 1 && o.max_batches >= 0,
                  "--seq_len, --batch_size and --max_batches must be positive");
  return o;
}

// The loader over the split's windows in order, checked against the model's vocabulary (and
// its tokenizer when one is known).
std::unique_ptr<data::DataLoader> eval_loader(const EvalOptions& o, const ModelSource& src, int64_t seq_len) {
  data::LoaderOptions lo;
  lo.split = o.split;
  lo.seq_len = seq_len;
  lo.batch_size = o.batch_size;
  lo.shuffle = false;
  lo.expected_vocab_size = src.config.model.vocab_size;
  try {
    const std::string tok = tokenizer_path_for(o.tokenizer, src);
    lo.tokenizer_checksum = data::file_checksum(tok);
    lo.tokenizer_checksum_legacy = data::file_checksum(tok, /*legacy=*/true);
  } catch (const ConfigError&) {
    // No tokenizer known: only the vocabulary size is checked.
  }
  return std::make_unique<data::DataLoader>(lo);
}

int run_eval(const ParsedArgs& args, World* world) {
  MPI_Comm comm = world->comm().get();
  const int tp = world->size();
  EvalOptions o;
  ModelSource src;
  int64_t seq_len = 0;
  run_agreed(comm, [&] {
    o = eval_options_from(args);
    src = resolve_model_source(o.model);
    llama_partition_specs(src.config.model, tp);  // ConfigError when tp does not divide the heads
    seq_len = o.seq_len > 0 ? o.seq_len : std::min(src.config.data.seq_len, src.config.model.max_seq_len);
    ANDY_USER_CHECK(seq_len <= src.config.model.max_seq_len, "--seq_len ", seq_len, " exceeds the model's max_seq_len ",
                    src.config.model.max_seq_len);
    ANDY_USER_CHECK(!src.int8 || o.device == "cpu", "--model_path ", o.model, " is int8: it runs on CPU only");
  });
  std::unique_ptr<data::DataLoader> loader;
  run_agreed(comm, [&] { loader = eval_loader(o, src, seq_len); });
  Config cfg;
  const GridOptions g = grid_options_from(cfg, o.device, "--device", tp, world);
  ProcessGrid grid(*world, g);
  const at::Device device = o.device == "cuda" ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(std::max(0, g.device)))
                                              : at::Device(at::kCPU);
  LlamaForCausalLM model{nullptr};
  run_agreed(comm, [&] { model = load_model_for_inference(src, grid, device); });

  const int64_t total = o.max_batches > 0 ? std::min(o.max_batches, loader->steps_per_epoch()) : loader->steps_per_epoch();
  at::NoGradGuard no_grad;
  double sum = 0;
  const auto t0 = std::chrono::steady_clock::now();
  auto last = t0;
  for (int64_t i = 0; i < total; ++i) {
    data::Batch b = loader->next_batch();
    at::Tensor logits = model->forward(b.input.to(device));
    sum += model->loss(logits.to(at::kFloat), b.target.to(device)).item<double>();
    const auto now = std::chrono::steady_clock::now();
    if (world->is_root() && now - last > std::chrono::seconds(5)) {
      last = now;
      const double el = std::chrono::duration<double>(now - t0).count();
      log::info("eval: ", i + 1, "/", total, " batches, ",
                static_cast<int64_t>((i + 1) * o.batch_size * seq_len / el), " tok/s, ETA ",
                static_cast<int64_t>(el / (i + 1) * (total - i - 1)), " s");
    }
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double loss = sum / static_cast<double>(total);
  if (world->is_root()) {
    nlohmann::json j = {{"model", o.model},
                        {"split", o.split},
                        {"batches", total},
                        {"tokens", total * o.batch_size * seq_len},
                        {"seq_len", seq_len},
                        {"loss", loss},
                        {"perplexity", std::exp(loss)},
                        {"int8", src.int8},
                        {"seconds", seconds}};
    std::printf("%s\n", j.dump().c_str());
    std::fflush(stdout);
    log::info("eval: ", o.model, " on ", o.split, ": loss ", loss, ", perplexity ", std::exp(loss), " over ",
              total * o.batch_size * seq_len, " tokens (", seconds, " s)");
  }
  return 0;
}

}  // namespace

Subcommand make_eval_command() {
  Subcommand c;
  c.name = "eval";
  c.summary = "loss and perplexity of a model on a split of preprocessed shards";
  c.usage =
      "usage: [mpirun -np TP] andyllm eval --model_path outputs/tiny/best_model\n"
      "                                    --val_file data/demo/processed/validation [--max_batches N]";
  c.flags = {{"model_path", "PATH", "best_model/, model.pt, a checkpoint step, an int8 or a Hugging Face directory"},
             {"model", "PATH", "alias of --model_path"},
             {"val_file", "SPLIT", "split directory (andyllm preprocess), a glob of .h5 shards or one .h5 file"},
             {"split", "SPLIT", "alias of --val_file"},
             {"tokenizer_path", "FILE", "the tokenizer the shards must have been written with; default: the model's"},
             {"seq_len", "N", "window length (default: the model's data.seq_len)"},
             {"batch_size", "N", "windows per forward (default 4)"},
             {"max_batches", "N", "score only the first N batches (default: every window)"},
             {"device", "cpu|cuda", "where the model runs (default cpu)"}};
  c.needs_mpi = true;
  c.run = run_eval;
  return c;
}

}  // namespace andy
