// `andyllm bench generate`: the engine's throughput and latency at several concurrencies, on
// random prompts of --input_len tokens that each generate exactly --output_len tokens (greedy,
// eos ignored), like vLLM's benchmark_throughput / benchmark_serving without HTTP. Per
// concurrency C, C requests are kept in flight until --num_prompts have finished.
//   prefill tok/s  tokens of steps that computed prompt tokens / those steps' time
//   decode tok/s   tokens of decode-only steps / those steps' time
//   output tok/s   generated tokens / wall time;  req/s  finished requests / wall time
//   TTFT           submit -> first token;  TPOT  (last - first token) / (tokens - 1)
// With --rounds N the list of concurrencies runs N times in turn, and a closing line gives each
// concurrency's decode rate over the first concurrency's of the same round, per round and the
// median: a ratio of rates measured minutes apart on a shared machine measures its load too.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <sstream>
#include <nlohmann/json.hpp>

#include "core/base/durable_fs.h"
#include "core/base/logging.h"
#include "launch/bench_stats.h"
#include "launch/commands.h"
#include "launch/serving.h"
#include "parallel/mpi_utils.h"

namespace andy {

namespace {

using Clock = std::chrono::steady_clock;

struct BenchRow {
  int64_t concurrency = 0, requests = 0, prompt_tokens = 0, output_tokens = 0;
  double seconds = 0, prefill_tps = 0, decode_tps = 0, output_tps = 0, req_per_s = 0;
  Percentiles ttft_ms, tpot_ms, itl_ms;
  int64_t kv_peak = 0, kv_total = 0, preemptions = 0;
  double forward_share = 0, sample_share = 0;  // of the wall time
};

BenchRow run_concurrency(serve::Engine& engine, int64_t c, int64_t num, int64_t input_len,
                         int64_t output_len, int64_t vocab, std::mt19937_64& rng) {
  struct Rec {
    Clock::time_point submit;
    std::vector<Clock::time_point> tokens;
    bool done = false;
  };
  std::vector<Rec> recs(static_cast<size_t>(num));
  std::uniform_int_distribution<int32_t> pick(4, static_cast<int32_t>(vocab - 1));
  serve::SamplingParams p;
  p.temperature = 0;
  p.max_tokens = output_len;
  p.ignore_eos = true;
  int64_t submitted = 0, finished = 0;
  auto submit_next = [&] {
    std::vector<int32_t> prompt(static_cast<size_t>(input_len));
    for (auto& t : prompt) t = pick(rng);
    Rec& r = recs[static_cast<size_t>(submitted++)];
    r.submit = Clock::now();
    engine.submit({prompt, p}, [&r, &finished](const serve::RequestUpdate& u) {
      const auto now = Clock::now();
      for (size_t i = 0; i < u.new_tokens.size(); ++i) r.tokens.push_back(now);
      if (u.request_finished) {
        r.done = true;
        ++finished;
      }
    });
  };
  const serve::EngineStats before = engine.stats();
  const auto t0 = Clock::now();
  int64_t kv_peak = 0;
  while (finished < num) {
    while (submitted < num && submitted - finished < c) submit_next();
    engine.step();
    kv_peak = std::max(kv_peak, engine.stats().kv_blocks_used);
  }
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  const serve::EngineStats after = engine.stats();
  BenchRow row;
  row.concurrency = c;
  row.requests = num;
  row.seconds = seconds;
  row.prompt_tokens = num * input_len;
  std::vector<double> ttft, tpot, itl;
  for (const Rec& r : recs) {
    row.output_tokens += static_cast<int64_t>(r.tokens.size());
    if (r.tokens.empty()) continue;
    ttft.push_back(std::chrono::duration<double, std::milli>(r.tokens.front() - r.submit).count());
    if (r.tokens.size() > 1)
      tpot.push_back(std::chrono::duration<double, std::milli>(r.tokens.back() - r.tokens.front()).count() /
                     static_cast<double>(r.tokens.size() - 1));
    for (size_t i = 1; i < r.tokens.size(); ++i)
      itl.push_back(std::chrono::duration<double, std::milli>(r.tokens[i] - r.tokens[i - 1]).count());
  }
  row.ttft_ms = percentiles(ttft);
  row.tpot_ms = percentiles(tpot);
  row.itl_ms = percentiles(itl);
  const double pre_s = after.prefill_step_seconds - before.prefill_step_seconds;
  const double dec_s = after.decode_step_seconds - before.decode_step_seconds;
  row.prefill_tps = pre_s > 0 ? (after.prefill_step_tokens - before.prefill_step_tokens) / pre_s : 0;
  row.decode_tps = dec_s > 0 ? (after.decode_step_tokens - before.decode_step_tokens) / dec_s : 0;
  row.output_tps = row.output_tokens / std::max(seconds, 1e-9);
  row.req_per_s = num / std::max(seconds, 1e-9);
  row.kv_peak = kv_peak;
  row.kv_total = after.kv_blocks_total;
  row.preemptions = after.num_preemptions - before.num_preemptions;
  row.forward_share = (after.forward_seconds - before.forward_seconds) / std::max(seconds, 1e-9);
  row.sample_share = (after.sample_seconds - before.sample_seconds) / std::max(seconds, 1e-9);
  return row;
}

// Prints the row (the table's line) and returns it as JSON.
nlohmann::json report(const BenchRow& r, int64_t round) {
  char ttft[64], tpot[64], kv[32];
  std::snprintf(ttft, sizeof ttft, "%.1f/%.1f/%.1f", r.ttft_ms.mean, r.ttft_ms.p50, r.ttft_ms.p99);
  std::snprintf(tpot, sizeof tpot, "%.2f/%.2f/%.2f", r.tpot_ms.mean, r.tpot_ms.p50, r.tpot_ms.p99);
  std::snprintf(kv, sizeof kv, "%lld/%lld", (long long)r.kv_peak, (long long)r.kv_total);
  std::printf("%5lld %5lld %9.2f %10.0f %10.0f %10.0f %7.2f %23s %23s %13s %6lld %4.0f/%3.0f%%\n",
              (long long)r.concurrency, (long long)r.requests, r.seconds, r.prefill_tps, r.decode_tps, r.output_tps,
              r.req_per_s, ttft, tpot, kv, (long long)r.preemptions, 100 * r.forward_share, 100 * r.sample_share);
  std::fflush(stdout);
  auto pct = [](const Percentiles& p) { return nlohmann::json{{"mean", p.mean}, {"p50", p.p50}, {"p99", p.p99}}; };
  return {{"round", round}, {"concurrency", r.concurrency}, {"requests", r.requests}, {"seconds", r.seconds},
          {"prefill_tokens_per_s", r.prefill_tps}, {"decode_tokens_per_s", r.decode_tps},
          {"output_tokens_per_s", r.output_tps}, {"requests_per_s", r.req_per_s}, {"ttft_ms", pct(r.ttft_ms)},
          {"tpot_ms", pct(r.tpot_ms)}, {"itl_ms", pct(r.itl_ms)}, {"kv_blocks_peak", r.kv_peak},
          {"forward_share", r.forward_share}, {"sample_share", r.sample_share}, {"kv_blocks_total", r.kv_total},
          {"preemptions", r.preemptions}};
}

double median_of(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// "# decode tok/s over concurrency 1, per round: c=32 8.10x 7.90x 8.30x, median 8.10x": each
// concurrency's decode rate over the first one's of the same round. decode[i][r]: concurrency
// i's decode tokens/s in round r.
void print_decode_ratios(const std::vector<int64_t>& concurrencies, const std::vector<std::vector<double>>& decode) {
  if (concurrencies.size() < 2) return;
  const size_t rounds = decode[0].size();
  std::printf("# decode tok/s over concurrency %lld, %s:", (long long)concurrencies[0],
              rounds > 1 ? "per round and the median" : "the same run");
  for (size_t i = 1; i < concurrencies.size(); ++i) {
    std::vector<double> ratios;
    std::printf(" c=%lld", (long long)concurrencies[i]);
    for (size_t r = 0; r < rounds; ++r) {
      ratios.push_back(decode[0][r] > 0 ? decode[i][r] / decode[0][r] : 0.0);
      std::printf(" %.2fx", ratios.back());
    }
    if (rounds > 1) std::printf(" (median %.2fx)", median_of(ratios));
    std::printf(i + 1 < concurrencies.size() ? ";" : "\n");
  }
  std::fflush(stdout);
}

}  // namespace

int bench_generate(const ParsedArgs& raw, World* world) {
  ParsedArgs args = with_serving_flags(raw);
  Config cfg = load_config_collectively(args, world);
  configure_threads(cfg, world);
  std::vector<int64_t> concurrencies;
  int64_t input_len = 0, output_len = 0, num_prompts = 0, rounds = 1;
  run_agreed(world->comm().get(), [&] {
    concurrencies = parse_positive_list(args.get("concurrency", "1,8,32"), "concurrency");
    input_len = args.get_int("input_len", 128);
    output_len = args.get_int("output_len", 128);
    num_prompts = args.get_int("num_prompts", 0);
    rounds = args.get_int("rounds", 1);
    ANDY_USER_CHECK(input_len >= 1 && output_len >= 1 && num_prompts >= 0 && rounds >= 1,
                    "andyllm bench generate: --input_len, --output_len and --rounds must be >= 1, --num_prompts >= 0");
  });
  ServingStack st = build_serving_stack(cfg, world);
  if (!world->is_root()) return st.engine->run_worker();
  serve::Engine& engine = *st.engine;
  if (input_len + output_len > engine.options().max_model_len) {  // reported once; all ranks exit 2
    log::error("andyllm bench generate: --input_len ", input_len, " + --output_len ", output_len,
               " exceeds max_model_len = ", engine.options().max_model_len);
    engine.shutdown_workers(2);
    return 2;
  }
  std::mt19937_64 rng(static_cast<uint64_t>(cfg.serve.seed) + 12345);
  // Warm-up (not reported): one short request.
  run_concurrency(engine, 1, 1, std::min<int64_t>(input_len, 8), 2, st.model_config.vocab_size, rng);
  std::printf("# bench generate: %s, tp %d, %s; input %lld, output %lld tokens; KV pool %lld blocks of %lld\n",
              cfg.serve.model.c_str(), world->size(), st.device.str().c_str(), (long long)input_len,
              (long long)output_len, (long long)engine.options().num_blocks, (long long)engine.options().block_size);
  std::printf("%5s %5s %9s %10s %10s %10s %7s %23s %23s %13s %6s %9s\n", "conc", "reqs", "seconds", "prefill/s",
              "decode/s", "output/s", "req/s", "TTFT ms mean/p50/p99", "TPOT ms mean/p50/p99", "KV peak", "preem",
              "fwd/samp");
  nlohmann::json rows = nlohmann::json::array();
  std::vector<std::vector<double>> decode(concurrencies.size());  // [concurrency][round]
  for (int64_t round = 1; round <= rounds; ++round) {
    if (rounds > 1) std::printf("# round %lld of %lld\n", (long long)round, (long long)rounds);
    for (size_t ci = 0; ci < concurrencies.size(); ++ci) {
      const int64_t c = concurrencies[ci];
      const int64_t num = num_prompts > 0 ? num_prompts : std::max<int64_t>(4, 2 * c);
      BenchRow r = run_concurrency(engine, c, num, input_len, output_len, st.model_config.vocab_size, rng);
      decode[ci].push_back(r.decode_tps);
      rows.push_back(report(r, round));
    }
  }
  print_decode_ratios(concurrencies, decode);
  engine.shutdown_workers();
  ANDY_CHECK(engine.num_free_blocks() == engine.options().num_blocks, "bench generate: ",
             engine.options().num_blocks - engine.num_free_blocks(), " KV blocks still held after every request ended");
  if (args.has("output")) write_file_durable(args.get("output"), rows.dump(2) + "\n");
  return 0;
}

}  // namespace andy
