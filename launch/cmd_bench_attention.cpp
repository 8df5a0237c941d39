// `andyllm bench attention`: the CPU decode-attention kernel alone (core/model/decode_attention_cpu.h)
// on a synthetic paged KV cache, one decode step = one query per sequence in every layer. Each
// instruction set the CPU has (portable loops, AVX2, AVX-512) runs on the same cache, with the
// sequences' blocks scattered over the pool (as a serving engine leaves them) and consecutive,
// in interleaved rounds (a noisy machine's drift hits every column alike); the median round is
// reported, with the KV bytes read per second and the ratio to the widest instruction set. The
// defaults are the tiny model's geometry per rank at TP=2, concurrency 32, 128 + 64 tokens.
// Under mpirun every rank runs its own copy at once, as TP ranks share the memory system; rank
// 0 prints.
//   mpirun -np 2 andyllm bench attention [--seqs 32 --context 192 --heads 4 --kv_heads 2
//       --head_dim 16 --layers 4 --block_size 16 --kv_cache_dtype fp32 --iters 100]
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "core/base/dtype_names.h"
#include "core/base/error.h"
#include "core/model/decode_attention_cpu.h"
#include "core/model/kv_cache.h"
#include "launch/commands.h"
#include "parallel/mpi_utils.h"
#include "parallel/world.h"

namespace andy {

int bench_attention(const ParsedArgs& args, World* world) {
  const int64_t seqs = args.get_int("seqs", 32), context = args.get_int("context", 192);
  const int64_t heads = args.get_int("heads", 4), kv_heads = args.get_int("kv_heads", 2);
  const int64_t d = args.get_int("head_dim", 16), layers = args.get_int("layers", 4);
  const int64_t bs = args.get_int("block_size", 16), iters = args.get_int("iters", 100);
  const std::string dtype_name = args.get("kv_cache_dtype", "fp32");
  if (seqs < 1 || context < 1 || kv_heads < 1 || heads < 1 || heads % kv_heads != 0 || d < 1 || layers < 1 ||
      bs < 1 || iters < 1)
    throw ConfigError("andyllm bench attention: expected positive --seqs, --context, --head_dim, --layers, "
                      "--block_size, --iters and --heads a multiple of --kv_heads");
  const std::optional<at::ScalarType> named = scalar_type_named(dtype_name);
  if (!named || !decode_attention_cpu_supports(*named))
    throw ConfigError("andyllm bench attention: --kv_cache_dtype " + dtype_name + ": expected fp32, bf16 or fp16");
  const at::ScalarType dtype = *named;
  at::set_num_threads(1);
  const bool root = !world || world->is_root();

  // The pool: per layer K [blocks, kv_heads, d, bs] and V [blocks, kv_heads, bs, d], random.
  const int64_t per_seq = (context + bs - 1) / bs, blocks = seqs * per_seq;
  at::manual_seed(7 + (world ? world->rank() : 0));
  std::vector<at::Tensor> k, v;
  for (int64_t l = 0; l < layers; ++l) {
    k.push_back(cpu_zeros_on_huge_pages({blocks, kv_heads, d, bs}, at::TensorOptions().dtype(dtype)));
    v.push_back(cpu_zeros_on_huge_pages({blocks, kv_heads, bs, d}, at::TensorOptions().dtype(dtype)));
    k.back().copy_(at::randn(k.back().sizes()));
    v.back().copy_(at::randn(v.back().sizes()));
  }
  const at::Tensor q = at::randn({seqs, heads, d});
  std::vector<int64_t> order(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) order[static_cast<size_t>(b)] = b;
  std::mt19937_64 rng(11);
  std::vector<int64_t> scattered = order;
  std::shuffle(scattered.begin(), scattered.end(), rng);
  struct Layout {
    const char* name;
    std::vector<std::vector<int64_t>> tables;
  };
  std::vector<Layout> layouts = {{"scattered", {}}, {"consecutive", {}}};
  for (int64_t s = 0; s < seqs; ++s) {
    auto first = static_cast<size_t>(s * per_seq), last = static_cast<size_t>((s + 1) * per_seq);
    layouts[0].tables.emplace_back(scattered.begin() + first, scattered.begin() + last);
    layouts[1].tables.emplace_back(order.begin() + first, order.begin() + last);
  }

  const std::vector<CpuIsa> isas = decode_attention_cpu_isas();  // widest first
  // One decode step over every layer into `out` [seqs, heads, d].
  auto step = [&](const Layout& lay, at::Tensor& out) {
    for (int64_t l = 0; l < layers; ++l) {
      DecodeAttentionArgs a;
      a.q = q.data_ptr<float>();
      a.k_cache = k[static_cast<size_t>(l)].data_ptr();
      a.v_cache = v[static_cast<size_t>(l)].data_ptr();
      a.kv_dtype = dtype;
      a.out = out.data_ptr<float>();
      a.n_head = heads;
      a.n_kv_head = kv_heads;
      a.head_dim = d;
      a.block_size = bs;
      a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
      for (int64_t s = 0; s < seqs; ++s) {
        a.rows.push_back(s);
        a.context_len.push_back(context);
        a.tables.push_back(&lay.tables[static_cast<size_t>(s)]);
      }
      decode_attention_cpu(a);
    }
  };

  // The outputs of every instruction set agree (the last layer's, scattered blocks).
  std::vector<at::Tensor> outs;
  for (CpuIsa isa : isas) {
    decode_attention_cpu_limit_isa(isa);
    outs.push_back(at::zeros({seqs, heads, d}));
    step(layouts[0], outs.back());
  }
  double worst = 0;
  for (const at::Tensor& o : outs)
    worst = std::max(worst, (o - outs[0]).norm().item<double>() / std::max(1e-30, outs[0].norm().item<double>()));

  constexpr int kRounds = 5;
  // times[layout][isa][round]: µs per step.
  std::vector<std::vector<std::vector<double>>> times(
      layouts.size(), std::vector<std::vector<double>>(isas.size(), std::vector<double>()));
  at::Tensor out = at::zeros({seqs, heads, d});
  for (int round = 0; round < kRounds; ++round)
    for (size_t li = 0; li < layouts.size(); ++li)
      for (size_t ii = 0; ii < isas.size(); ++ii) {
        decode_attention_cpu_limit_isa(isas[ii]);
        step(layouts[li], out);  // warm
        const auto t0 = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < iters; ++i) step(layouts[li], out);
        times[li][ii].push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
                                static_cast<double>(iters));
      }
  decode_attention_cpu_limit_isa(CpuIsa::kAvx512);
  if (world && world->size() > 1) MPI_Barrier(world->comm().get());
  if (!root) return 0;
  const double bytes = static_cast<double>(seqs * context * kv_heads * d * 2 * layers) * c10::elementSize(dtype);
  std::printf("# bench attention: %lld sequences x %lld tokens, %lld/%lld heads of %lld, %lld layers, blocks of %lld, "
              "%s cache (%.2f MB read per step), %lld steps x %d rounds, %d rank(s)\n",
              (long long)seqs, (long long)context, (long long)heads, (long long)kv_heads, (long long)d, (long long)layers,
              (long long)bs, dtype_name.c_str(), bytes / 1e6, (long long)iters, kRounds, world ? world->size() : 1);
  std::printf("# %-12s %-9s %12s %10s %10s\n", "blocks", "isa", "us/step", "GB/s", "vs widest");
  for (size_t li = 0; li < layouts.size(); ++li) {
    std::vector<double> med;
    for (auto t : times[li]) {
      std::sort(t.begin(), t.end());
      med.push_back(t[t.size() / 2]);
    }
    for (size_t ii = 0; ii < isas.size(); ++ii)
      std::printf("  %-12s %-9s %12.1f %10.2f %9.2fx\n", layouts[li].name, cpu_isa_name(isas[ii]), med[ii],
                  bytes / med[ii] / 1e3, med[0] / med[ii]);
  }
  std::printf("# outputs of the %zu instruction sets agree: largest relative difference %.2e\n", isas.size(), worst);
  return worst < 1e-5 ? 0 : 1;
}

}  // namespace andy
