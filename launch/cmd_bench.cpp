// `andyllm bench TARGET`: comm (collective bandwidth + correctness, nccl-tests style).
#include <algorithm>
#include <cstdio>

#include "core/base/dtype_names.h"
#include "core/base/logging.h"
#include "core/base/torch_compat.h"
#include "launch/commands.h"
#include "launch/serving.h"
#include "parallel/comm_bench.h"
#include "parallel/process_grid.h"

namespace andy {

int bench_data(const ParsedArgs& args, World* world);  // launch/cmd_bench_data.cpp
int bench_train(const ParsedArgs& args, World* world);  // launch/cmd_bench_train.cpp
int bench_generate(const ParsedArgs& args, World* world);  // launch/cmd_bench_generate.cpp
int bench_serve(const ParsedArgs& args, World* world);     // launch/cmd_bench_serve.cpp
int bench_attention(const ParsedArgs& args, World* world);  // launch/cmd_bench_attention.cpp

namespace {

at::ScalarType parse_dtype(const std::string& s) {
  if (const auto t = scalar_type_named(s)) return *t;
  throw ConfigError("--dtype " + s + ": expected fp32, fp64, bf16, fp16, int32 or int64");
}

int bench_comm(const ParsedArgs& args, World* world) {
  CommBenchOptions o;
  o.min_bytes = args.get_int("min_bytes", o.min_bytes);
  o.max_bytes = args.get_int("max_bytes", o.max_bytes);
  o.factor = args.get_int("factor", o.factor);
  o.iters = static_cast<int>(args.get_int("iters", o.iters));
  o.warmup = static_cast<int>(args.get_int("warmup", o.warmup));
  o.dtype = parse_dtype(args.get("dtype", "fp32"));
  o.debug_skip_rank = static_cast<int>(args.get_int("debug_skip_rank", -1));
  o.raw = !args.has("no_raw");
  if (args.has("op") && args.get("op") != "all") o.ops = {args.get("op")};
  if (o.min_bytes < 1 || o.max_bytes < o.min_bytes || o.factor < 2 || o.iters < 1 || o.warmup < 0) {
    throw ConfigError("andyllm bench comm: expected 1 <= --min_bytes <= --max_bytes, --factor >= 2, --iters >= 1");
  }
  std::string backend = args.get("backend", "mpi");
  if (backend != "mpi" && backend != "nccl") throw ConfigError("--backend " + backend + ": expected mpi or nccl");
  GridOptions g;
  g.backend = backend == "nccl" ? Backend::kNccl : Backend::kMpi;
  g.timeout = std::chrono::milliseconds(static_cast<int64_t>(args.get_double("timeout", 300) * 1000));
  if (g.backend == Backend::kNccl) {
    ANDY_CHECK_T(ConfigError, at::hasCUDA(), "--backend nccl needs a CUDA LibTorch and a visible GPU; "
                 "this LibTorch ", (at::hasCUDA() ? "has" : "has no"), " CUDA device: use --backend mpi");
    g.device = world->device_for_local_rank(compat::cuda_device_count());
    o.device = at::Device(at::kCUDA, g.device);
  }
  // --group tp: every rank in one tensor-parallel group, whose communicator is the one the TP
  // layers use (on MPI: polled, all-reduces of any size through shared memory on one node).
  const std::string group = args.get("group", "world");
  if (group != "world" && group != "tp") throw ConfigError("--group " + group + ": expected world or tp");
  if (group == "tp") g.tensor_parallel_size = world->size();
  ProcessGrid grid(*world, g);
  Communicator& comm = group == "tp" ? grid.tp() : grid.world();
  if (world->is_root()) std::printf("%s", comm_bench_header(comm, o).c_str());
  int64_t wrong = 0;
  run_comm_bench(comm, o, [&](const CommBenchRow& row) {
    wrong += row.wrong;
    if (world->is_root()) {
      std::printf("%s", comm_bench_format(row, o.dtype).c_str());
      std::fflush(stdout);
    }
  });
  if (world->is_root()) {
    std::printf("# %d ranks, #wrong total: %lld -> %s\n", world->size(), static_cast<long long>(wrong),
                wrong == 0 ? "collective check passed" : "COLLECTIVE CHECK FAILED");
  }
  return wrong == 0 ? 0 : 1;
}

}  // namespace

Subcommand make_bench_command() {
  Subcommand c;
  c.name = "bench";
  c.summary = "benchmarks: comm (collective bandwidth and correctness, nccl-tests style), data (loader), train (tokens/s, MFU, comm share), generate (engine throughput and latency), serve (an OpenAI server over HTTP), attention (the CPU decode-attention kernel per instruction set)";
  c.usage =
      "usage: mpirun -np N andyllm bench comm [--min_bytes B --max_bytes B --factor F --dtype T --group world|tp --no_raw]\n"
      "       [mpirun -np N] andyllm bench data [--train_file PATH --seq_len N --batch_size N --step_ms MS]\n"
      "       mpirun -np N andyllm bench train --config FILE [--set K=V ...] [--steps N --warmup N --profile FILE]\n"
      "       mpirun -np TP andyllm bench generate --model DIR [--concurrency 1,8,32 --input_len N --output_len N]\n"
      "       andyllm bench serve --url http://127.0.0.1:8000 [--concurrency 1,8,32 --num_prompts N --input_len N --output_len N]\n"
      "       [mpirun -np N] andyllm bench attention [--seqs N --context N --heads N --kv_heads N --head_dim N --layers N\n"
      "       --block_size N --kv_cache_dtype fp32|bf16|fp16 --iters N]";
  c.flags = {{"min_bytes", "B", "smallest buffer (default 8)"},
             {"max_bytes", "B", "largest buffer (default 8388608)"},
             {"factor", "F", "size multiplier between rows (default 8)"},
             {"iters", "N", "comm: timed iterations per size (default 5); attention: timed steps per round (default 100)"},
             {"warmup", "N", "untimed iterations per size (default 2)"},
             {"dtype", "T", "comm: fp32 (default), fp64, bf16, fp16, int32, int64; generate: the served model's (serve.dtype: auto, fp32, bf16)"},
             {"op", "OP", "all (default), all_reduce, all_gather, reduce_scatter, broadcast"},
             {"backend", "mpi|nccl", "communicator backend (default mpi, CPU tensors)"},
             {"group", "world|tp", "comm: the world communicator (default; on MPI: the communication thread, small "
                                   "collectives through shared memory on one node) or the tensor-parallel group's, all "
                                   "ranks in one TP group (on MPI: polled, all-reduces of any size through shared memory)"},
             {"timeout", "SECONDS", "collective timeout (default 300)"},
             {"no_raw", "", "comm: skip the raw library call (blocking MPI_Allreduce ..., ncclAllReduce ...) columns"},
             {"debug_skip_rank", "R", "testing: rank R skips the first collective, to show the timeout path"},
             // bench data
             {"config", "FILE", "data: TOML run config (data.*, train.batch_size, train.seed)"},
             {"set", "SECTION.KEY=VALUE", "data: override one config key", true},
             {"train_file", "PATH", "data: split to read (default data.train_file)"},
             {"tokenizer_path", "PATH", "data: the run's tokenizer (its checksum is checked)"},
             {"batch_size", "N", "data: micro-batch per rank (default train.batch_size)"},
             {"split", "PATH", "data: split to read, overrides --train_file"},
             {"seq_len", "N", "data: tokens per window (default data.seq_len)"},
             {"batches", "N", "data: batches to serve (default 200)"},
             {"prefetch", "N", "data: batches read ahead (default data.prefetch_batches)"},
             {"step_ms", "MS", "data: simulated training step per batch (default 0)"},
             {"verify", "", "data: verify shard checksums against manifest.json first"},
             // bench train (also --config, --set)
             {"steps", "N", "train: optimizer steps to run (default 20)"},
             {"warmup", "N", "train: first steps not timed (default 3)"},
             {"profile", "FILE", "train: after the timed steps, trace --profile_steps more with LibTorch's profiler "
                                 "(CPU ops and CUDA kernels) into FILE (Chrome trace JSON; rank R writes FILE.rankR "
                                 "when several; LibTorch 2.1+, see docs/PERFORMANCE.md)"},
             {"profile_steps", "N", "train: steps traced by --profile (default 3)"},
             // bench generate (also --config, --set and the serving flags)
             {"concurrency", "C1,C2,..", "generate: requests in flight (default 1,8,32)"},
             {"input_len", "N", "generate: prompt tokens per request (default 128)"},
             {"output_len", "N", "generate: generated tokens per request (default 128)"},
             {"num_prompts", "N", "generate, serve: requests per concurrency (generate: default max(4, 2 x C); serve: 64)"},
             {"rounds", "N", "generate: run the --concurrency list N times in turn (default 1) and print each "
                             "concurrency's decode rate over the first one's, per round and their median: "
                             "rates a round apart are measured under the same machine load"},
             {"output", "FILE", "generate: also write the rows as JSON"},
             // bench attention (also --iters, --block_size, --kv_cache_dtype)
             {"seqs", "N", "attention: sequences decoded per step (default 32)"},
             {"context", "N", "attention: cached tokens per sequence (default 192)"},
             {"heads", "N", "attention: query heads per rank (default 4)"},
             {"kv_heads", "N", "attention: kv heads per rank (default 2)"},
             {"head_dim", "N", "attention: head size (default 16)"},
             {"layers", "N", "attention: layers, each with its own cache (default 4)"},
             // bench serve (also --concurrency, --input_len, --output_len, --num_prompts)
             {"url", "URL", "serve: the server (default http://127.0.0.1:8000)"}};
  for (const Flag& f : serving_flags())
    if (std::none_of(c.flags.begin(), c.flags.end(), [&](const Flag& g) { return g.name == f.name; }))
      c.flags.push_back(f);
  c.needs_mpi = true;
  c.run = [](const ParsedArgs& args, World* world) {
    std::string target = args.positional().empty() ? "" : args.positional()[0];
    reject_positional(args, "bench " + target, 1);
    if (target == "comm") return bench_comm(args, world);
    if (target == "data") return bench_data(args, world);
    if (target == "train") return bench_train(args, world);
    if (target == "generate") return bench_generate(args, world);
    if (target == "serve") return bench_serve(args, world);
    if (target == "attention") return bench_attention(args, world);
    throw ConfigError("andyllm bench: expected a target: comm, data, train, generate, serve or attention (got '" + target +
                      "')");
  };
  return c;
}

}  // namespace andy
