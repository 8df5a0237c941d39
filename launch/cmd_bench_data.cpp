// `andyllm bench data`: the loader's reading cost per batch. Builds the training DataLoader on
// a split (one per rank under mpirun, each rank its own DP share), serves --batches batches,
// optionally sleeping --step_ms per batch to stand in for a training step, and prints the time
// the read-ahead thread spent per batch (HDF5 reads + assembly) and the time next_batch() waited.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <thread>

#include "core/base/logging.h"
#include "data/checksum.h"
#include "data/loader.h"
#include "data/tokenizer.h"
#include "launch/commands.h"
#include "parallel/world.h"

namespace andy {

int bench_data(const ParsedArgs& args, World* world) {
  Config cfg = load_config(args);
  data::LoaderOptions o;
  o.split = args.get("split", cfg.data.train_file);
  o.seq_len = args.get_int("seq_len", cfg.data.seq_len);
  o.batch_size = cfg.train.batch_size;
  o.seed = static_cast<uint64_t>(cfg.train.seed);
  o.prefetch_batches = args.get_int("prefetch", cfg.data.prefetch_batches);
  o.dp_rank = world ? world->rank() : 0;
  o.dp_size = world ? world->size() : 1;
  o.verify_checksums = args.has("verify");
  std::string tok_path = cfg.data.tokenizer_path;
  if (!tok_path.empty() && std::ifstream(tok_path).good()) {
    o.tokenizer_checksum = data::file_checksum(tok_path);
  } else {
    log::warn("bench data: tokenizer ", tok_path,
              " not found; shard tokenizer checksums not checked");
  }
  int64_t batches = args.get_int("batches", 200);
  double step_ms = args.get_double("step_ms", 0);
  if (batches < 1) throw ConfigError("--batches " + std::to_string(batches) + ": expected >= 1");

  auto t_open = std::chrono::steady_clock::now();
  data::DataLoader loader(o);
  double open_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_open).count();
  if (!world || world->is_root()) {
    std::printf("# bench data: split %s, %zu shards, %lld tokens, vocab %lld\n", o.split.c_str(),
                loader.shards().size(), static_cast<long long>(loader.total_tokens()),
                static_cast<long long>(loader.shards()[0].vocab_size));
    std::printf(
        "# seq_len %lld, batch %lld x %d ranks, %lld windows, %lld steps/epoch, prefetch %lld, "
        "open %.3f s\n",
        static_cast<long long>(o.seq_len), static_cast<long long>(o.batch_size), o.dp_size,
        static_cast<long long>(loader.windows_per_epoch()),
        static_cast<long long>(loader.steps_per_epoch()),
        static_cast<long long>(o.prefetch_batches), open_s);
  }
  auto t0 = std::chrono::steady_clock::now();
  int64_t tokens = 0;
  for (int64_t i = 0; i < batches; ++i) {
    data::Batch b = loader.next_batch();
    tokens += b.input.numel();
    if (step_ms > 0)
      std::this_thread::sleep_for(std::chrono::microseconds(static_cast<int64_t>(step_ms * 1000)));
  }
  double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  data::LoaderStats s = loader.stats();
  std::printf(
      "rank %d: %lld batches, read %.3f ms/batch (%.0f tokens/s when reading), waited %.3f "
      "ms/batch "
      "(first %.3f ms, then max %.3f ms), step %.1f ms, wall %.3f s (%.0f tokens/s served)\n",
      world ? world->rank() : 0, static_cast<long long>(batches),
      1e3 * s.read_seconds / std::max<int64_t>(1, s.batches_read),
      s.read_seconds > 0 ? s.batches_read * o.batch_size * o.seq_len / s.read_seconds : 0.0,
      1e3 * s.wait_seconds / batches, 1e3 * s.first_wait_seconds, 1e3 * s.max_wait_seconds, step_ms,
      wall, tokens / wall);
  std::fflush(stdout);
  return 0;
}

}  // namespace andy
