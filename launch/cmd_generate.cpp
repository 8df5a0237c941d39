// `andyllm generate`: offline completion of prompts on the inference engine (tensor parallel
// over the ranks of mpirun, continuous batching of every prompt at once), one JSON line per
// completion. And `andyllm bench generate`: the engine's throughput and latency at several
// concurrencies (launch/cmd_bench.cpp dispatches to it).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <nlohmann/json.hpp>

#include "core/base/durable_fs.h"
#include "core/base/logging.h"
#include "launch/commands.h"
#include "launch/serving.h"
#include "parallel/mpi_utils.h"

namespace andy {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Prompts of --prompt (repeatable) and --prompts_file (JSON lines: {"prompt": "..."} or a JSON
// string per line). Invalid UTF-8 or JSON is refused naming the file and line.
std::vector<std::string> read_prompts(const ParsedArgs& args) {
  std::vector<std::string> prompts;
  for (const auto& [flag, value] : args.ordered()) {
    if (flag != "prompt") continue;
    ANDY_USER_CHECK(is_valid_utf8(value), "--prompt: not valid UTF-8");
    prompts.push_back(value);
  }
  if (args.has("prompts_file")) {
    const std::string path = args.get("prompts_file");
    std::ifstream f(path);
    ANDY_USER_CHECK(f.good(), "--prompts_file ", path, ": cannot read it");
    std::string line;
    for (int64_t n = 1; std::getline(f, line); ++n) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      ANDY_USER_CHECK(is_valid_utf8(line), path, ":", n, ": not valid UTF-8 (prompts files are UTF-8 JSON lines)");
      json j;
      try {
        j = json::parse(line);
      } catch (const std::exception& e) {
        throw ConfigError(detail::concat(path, ":", n, ": not JSON (expected {\"prompt\": \"...\"} or a JSON string): ", e.what()));
      }
      if (j.is_string()) {
        prompts.push_back(j.get<std::string>());
      } else {
        ANDY_USER_CHECK(j.is_object() && j.contains("prompt") && j["prompt"].is_string(), path, ":", n,
                     ": expected {\"prompt\": \"...\"} or a JSON string");
        prompts.push_back(j["prompt"].get<std::string>());
      }
    }
  }
  ANDY_USER_CHECK(!prompts.empty(), "andyllm generate: no prompt: give --prompt TEXT or --prompts_file FILE.jsonl");
  return prompts;
}

// Collected completions of one request.
struct Collected {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<serve::SampledToken>> sampled;
  std::vector<std::string> finish;
  int64_t prompt_tokens = 0, cached = 0;
  std::string error;
  bool done = false;
};

json logprobs_json(const std::vector<serve::SampledToken>& v, const data::Tokenizer& tok) {
  json out = json::array();
  for (const auto& t : v) {
    json top = json::array();
    for (const auto& [id, lp] : t.top) top.push_back({{"token_id", id}, {"token", tok.id_to_piece(id)}, {"logprob", lp}});
    out.push_back({{"token_id", t.token}, {"token", tok.id_to_piece(t.token)}, {"logprob", t.logprob}, {"top_logprobs", top}});
  }
  return out;
}

// Rank 0: the prompts and sampling flags, checked before the model loads (agreed).
void read_generate_inputs(const ParsedArgs& args, const Config& cfg, World* world, std::vector<std::string>* prompts,
                          serve::SamplingParams* params) {
  run_agreed(world->comm().get(), [&] {
    if (!world->is_root()) return;
    *prompts = read_prompts(args);
    *params = sampling_from_flags(args, cfg.serve.max_tokens_default);
    const std::string bad = params->validate(1 << 30);
    ANDY_USER_CHECK(bad.empty(), "andyllm generate: ", bad);
    if (args.has("output")) {
      fs::path parent = fs::path(args.get("output")).parent_path();
      ANDY_USER_CHECK(parent.empty() || fs::is_directory(parent), "--output ", args.get("output"),
                      ": the directory ", parent.string(), " does not exist");
    }
  });
}

// Every prompt tokenized and checked first; the first that cannot be served is the error ("" if
// none), so nothing runs or is written for a bad prompt.
std::string tokenize_prompts(const std::vector<std::string>& prompts, const data::Tokenizer& tok, int64_t max_tokens,
                             int64_t max_len, std::vector<std::vector<int32_t>>* ids) {
  for (size_t i = 0; i < prompts.size(); ++i) {
    ids->push_back(tok.encode(prompts[i]));
    const int64_t n = static_cast<int64_t>(ids->back().size());
    if (n == 0) return "prompt " + std::to_string(i) + " is empty";
    if (n + max_tokens > max_len)
      return "prompt " + std::to_string(i) + " has " + std::to_string(n) + " tokens; with --max_tokens " +
             std::to_string(max_tokens) + " that exceeds max_model_len = " + std::to_string(max_len) +
             " (lower --max_tokens or shorten the prompt)";
  }
  return "";
}

// Every prompt goes into the engine at once: continuous batching serves them together.
void submit_all(serve::Engine& engine, const std::vector<std::vector<int32_t>>& prompt_ids,
                const serve::SamplingParams& params, std::vector<Collected>* results) {
  results->assign(prompt_ids.size(), Collected{});
  for (size_t i = 0; i < prompt_ids.size(); ++i) {
    Collected& c = (*results)[i];
    c.tokens.resize(params.n);
    c.sampled.resize(params.n);
    c.finish.resize(params.n);
    engine.submit({prompt_ids[i], params}, [&c](const serve::RequestUpdate& u) {
      if (!u.error.empty()) {
        c.error = u.error;
        c.done = true;
        return;
      }
      auto& t = c.tokens[u.index];
      t.insert(t.end(), u.new_tokens.begin(), u.new_tokens.end());
      auto& s = c.sampled[u.index];
      s.insert(s.end(), u.new_sampled.begin(), u.new_sampled.end());
      if (u.finished) c.finish[u.index] = u.finish_reason;
      c.prompt_tokens = u.prompt_tokens;
      if (u.finished) c.cached = std::max(c.cached, u.cached_prompt_tokens);
      if (u.request_finished) c.done = true;
    });
  }
}

// Steps the engine until every request is done, with a progress line every 5 s; the seconds.
double run_to_completion(serve::Engine& engine, size_t n_prompts) {
  const auto t0 = std::chrono::steady_clock::now();
  auto last_report = t0;
  while (engine.step()) {
    const auto now = std::chrono::steady_clock::now();
    if (now - last_report <= std::chrono::seconds(5)) continue;
    last_report = now;
    const serve::EngineStats s = engine.stats();
    const double el = std::chrono::duration<double>(now - t0).count();
    const int64_t done = s.requests_finished + s.requests_refused;
    log::info("generate: ", done, "/", n_prompts, " prompts done, ", s.generation_tokens, " tokens (",
              static_cast<int64_t>(s.generation_tokens / std::max(el, 1e-9)), " tok/s), ", s.num_running,
              " running, ", s.num_waiting, " waiting; ETA ",
              done > 0 ? std::to_string(static_cast<int64_t>(el / done * (n_prompts - done))) + " s" : "?");
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One JSON line per completion (an error line per failed prompt); counts the failed prompts
// and generated tokens.
std::string completion_lines(const std::vector<std::string>& prompts, const std::vector<Collected>& results,
                             const serve::SamplingParams& params, const data::Tokenizer& tok, int64_t* failed,
                             int64_t* generated) {
  std::ostringstream out;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Collected& c = results[i];
    if (!c.error.empty()) {
      ++*failed;
      log::error("prompt ", i, ": ", c.error);
      out << json({{"index", i}, {"prompt", prompts[i]}, {"error", c.error}}).dump() << "\n";
      continue;
    }
    for (int64_t k = 0; k < params.n; ++k) {
      json j = {{"index", i},
                {"completion", k},
                {"prompt", prompts[i]},
                {"text", tok.decode(c.tokens[k])},
                {"token_ids", c.tokens[k]},
                {"finish_reason", c.finish[k]},
                {"prompt_tokens", c.prompt_tokens},
                {"completion_tokens", c.tokens[k].size()},
                {"cached_prompt_tokens", c.cached}};
      if (params.logprobs >= 0) j["logprobs"] = logprobs_json(c.sampled[k], tok);
      *generated += static_cast<int64_t>(c.tokens[k].size());
      out << j.dump() << "\n";
    }
  }
  return out.str();
}

int run_generate(const ParsedArgs& raw, World* world) {
  reject_positional(raw, "generate");
  ParsedArgs args = with_serving_flags(raw);
  Config cfg = load_config_collectively(args, world);
  if (handle_config_info_flags(args, cfg)) return 0;
  configure_threads(cfg, world);
  std::vector<std::string> prompts;
  serve::SamplingParams params;
  read_generate_inputs(args, cfg, world, &prompts, &params);
  ServingStack st = build_serving_stack(cfg, world);
  if (!world->is_root()) return st.engine->run_worker();
  const data::Tokenizer& tok = *st.tokenizer;
  std::vector<std::vector<int32_t>> prompt_ids;
  const std::string bad =
      tokenize_prompts(prompts, tok, params.max_tokens, st.engine->options().max_model_len, &prompt_ids);
  if (!bad.empty()) {  // reported once by rank 0; every rank exits 2
    log::error("andyllm generate: ", bad, "; nothing was generated");
    st.engine->shutdown_workers(2);
    return 2;
  }
  std::vector<Collected> results;
  submit_all(*st.engine, prompt_ids, params, &results);
  const double seconds = run_to_completion(*st.engine, prompts.size());
  st.engine->shutdown_workers();
  int64_t failed = 0, generated = 0;
  const std::string lines = completion_lines(prompts, results, params, tok, &failed, &generated);
  if (args.has("output")) {
    write_file_durable(args.get("output"), lines);
    log::info("wrote ", args.get("output"));
  } else {
    std::fwrite(lines.data(), 1, lines.size(), stdout);
    std::fflush(stdout);
  }
  const serve::EngineStats s = st.engine->stats();
  log::info("generate: ", prompts.size(), " prompt(s), ", generated, " tokens in ", seconds, " s (",
            static_cast<int64_t>(generated / std::max(seconds, 1e-9)), " tok/s); ", s.steps,
            " engine steps, ", s.num_preemptions, " preemptions, prefix cache ", s.prefix_hits_tokens,
            "/", s.prefix_queries_tokens, " tokens hit");
  return failed == 0 ? 0 : 2;
}

}  // namespace

Subcommand make_generate_command() {
  Subcommand c;
  c.name = "generate";
  c.summary = "offline text generation on the inference engine (tensor parallel over the ranks)";
  c.usage =
      "usage: mpirun -np TP andyllm generate --model outputs/tiny/best_model --prompt TEXT [--max_tokens N]\n"
      "       mpirun -np TP andyllm generate --model DIR --prompts_file prompts.jsonl --output out.jsonl\n"
      "  one JSON line per completion: prompt, text, token_ids, finish_reason, token counts";
  c.flags = serving_flags();  // --device and --tokenizer_path here are the serving ones
  for (auto& f : config_flags())
    if (std::none_of(c.flags.begin(), c.flags.end(), [&](const Flag& g) { return g.name == f.name; }))
      c.flags.push_back(f);
  for (auto& f : sampling_flags()) c.flags.push_back(f);
  c.flags.push_back({"prompt", "TEXT", "a prompt (repeatable)", true});
  c.flags.push_back({"prompts_file", "FILE", "JSON lines: {\"prompt\": \"...\"} or a JSON string each"});
  c.flags.push_back({"output", "FILE", "where the JSON lines go (default: standard output)"});
  c.needs_mpi = true;
  c.run = run_generate;
  return c;
}

}  // namespace andy
