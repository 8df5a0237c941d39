// `andyllm bench serve`: the serving benchmark against a running OpenAI-compatible server (ours
// or any other), in the shape of vLLM's benchmark_serving: per concurrency C, C clients (one
// keep-alive connection each) stream completions of exactly --input_len prompt tokens and
// --output_len generated tokens (ignore_eos, greedy) until --num_prompts are done. Reported:
// request and output-token throughput; TTFT, TPOT ((last - first token) / (tokens - 1)), ITL
// (gap between streamed chunks) and end-to-end latency, mean / p50 / p90 / p99 in ms.
// Every request has its own prompt (a seeded draw of the tokens of some English text, tokenized
// by the server's /tokenize), so no two share a prefix and the prefix cache does not flatter the
// numbers. The client is C++ so that, on a small machine, it takes little of the CPU the server
// needs (scripts/bench_serve.py is the same benchmark in Python).
#include <httplib.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>
#include <string_view>
#include <thread>

#include "core/base/error.h"
#include "launch/bench_stats.h"
#include "launch/commands.h"

namespace andy {

namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Target {
  std::string host;
  int port = 0;
  std::string model;
};

Target parse_url(const std::string& url) {
  std::string rest = url;
  const std::string scheme = "http://";
  ANDY_USER_CHECK(rest.rfind(scheme, 0) == 0, "--url ", url, ": expected http://HOST:PORT");
  rest = rest.substr(scheme.size());
  if (!rest.empty() && rest.back() == '/') rest.pop_back();
  const size_t colon = rest.rfind(':');
  Target t;
  t.host = rest.substr(0, colon);
  t.port = colon == std::string::npos ? 80 : std::atoi(rest.c_str() + colon + 1);
  ANDY_USER_CHECK(!t.host.empty() && t.port > 0, "--url ", url, ": expected http://HOST:PORT");
  return t;
}

httplib::Client client_of(const Target& t) {
  httplib::Client c(t.host, t.port);
  c.set_keep_alive(true);
  c.set_tcp_nodelay(true);  // the request's header and body writes leave without waiting for an ACK
  c.set_read_timeout(600, 0);
  return c;
}

json get_json(httplib::Client& c, const std::string& path, const std::string& body = "") {
  auto res = body.empty() ? c.Get(path.c_str()) : c.Post(path.c_str(), body, "application/json");
  ANDY_USER_CHECK(res && res->status == 200, "bench serve: ", (body.empty() ? "GET " : "POST "), path, " failed (",
                  res ? "HTTP " + std::to_string(res->status) + " " + res->body : httplib::to_string(res.error()),
                  "): is the server running at that --url?");
  return json::parse(res->body);
}

// Token ids of ordinary English text, as the server tokenizes it: the alphabet of the prompts.
std::vector<int64_t> text_tokens(httplib::Client& c, const Target& t, int64_t n) {
  std::string text;
  while (static_cast<int64_t>(text.size()) < 8 * n + 64)
    text += "the quick brown fox jumps over the lazy dog in the morning light by the river ";
  const json r = get_json(c, "/tokenize", json{{"model", t.model}, {"prompt", text}}.dump());
  std::vector<int64_t> ids = r["tokens"].get<std::vector<int64_t>>();
  ANDY_USER_CHECK(static_cast<int64_t>(ids.size()) >= n, "bench serve: could not make a prompt of ", n, " tokens");
  ids.resize(static_cast<size_t>(n));
  return ids;
}

struct Result {
  bool ok = false;
  std::string error;
  double ttft = 0, e2e = 0;  // seconds
  std::vector<double> itl;   // seconds between chunks with text
  int64_t output_tokens = 0;
};

// Whether a completion chunk (a compact JSON object) carries text: 1 or 0 when it is a plain
// text chunk, -1 when it needs a full parse (usage, an error, or a shape not recognised here).
int chunk_has_text(std::string_view data) {
  if (data.find("\"usage\"") != std::string_view::npos || data.find("\"error\"") != std::string_view::npos) return -1;
  const size_t k = data.find("\"text\":");
  if (k == std::string_view::npos || data.find("\"text\":", k + 1) != std::string_view::npos) return -1;
  size_t v = k + 7;
  while (v < data.size() && (data[v] == ' ' || data[v] == '\t')) ++v;
  if (v + 1 >= data.size() || data[v] != '"') return -1;
  return data[v + 1] == '"' ? 0 : 1;
}

// One streamed completion; SSE events are read as they arrive.
Result one_request(httplib::Client& c, const json& body) {
  Result r;
  const auto t0 = Clock::now();
  Clock::time_point last{};
  std::string buf;
  bool first = true;
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    buf.append(d, n);
    for (size_t end; (end = buf.find("\n\n")) != std::string::npos; buf.erase(0, end + 2)) {
      if (buf.rfind("data: ", 0) != 0) continue;  // an SSE comment (": ping")
      const std::string_view data(buf.data() + 6, end - 6);
      if (data == "[DONE]") continue;
      // Most events are one token's text chunk: read whether its text is empty without parsing
      // the whole chunk (a full parse per event was most of this client's CPU, on the cores the
      // server under test shares on one machine). The usage and error chunks are parsed.
      int text = chunk_has_text(data);
      if (text < 0) {
        const json j = json::parse(data, nullptr, false);
        if (j.is_discarded() || j.contains("error")) {
          r.error = std::string(data);
          continue;
        }
        if (j.contains("usage") && j["usage"].is_object()) r.output_tokens = j["usage"]["completion_tokens"].get<int64_t>();
        text = !j["choices"].empty() && !j["choices"][0]["text"].get<std::string>().empty();
      }
      if (!text) continue;
      const auto now = Clock::now();
      if (first) r.ttft = std::chrono::duration<double>(now - t0).count();
      else r.itl.push_back(std::chrono::duration<double>(now - last).count());
      first = false;
      last = now;
    }
    return true;
  };
  auto res = c.send(req);
  r.e2e = std::chrono::duration<double>(Clock::now() - t0).count();
  if (!res) r.error = "no response: " + httplib::to_string(res.error());
  else if (res->status != 200) r.error = "HTTP " + std::to_string(res->status);
  r.ok = r.error.empty() && !first;
  return r;
}

struct Level {
  int64_t ok = 0, errors = 0, output_tokens = 0;
  double seconds = 0;
  Percentiles ttft, tpot, itl, e2e;  // ms
  std::string first_error;
};

Level run_level(const Target& t, const std::vector<int64_t>& alphabet, int64_t concurrency, int64_t num,
                int64_t output_len) {
  std::vector<Result> results(static_cast<size_t>(num));
  std::atomic<int64_t> next{0};
  const auto t0 = Clock::now();
  std::vector<std::thread> clients;
  for (int64_t k = 0; k < concurrency; ++k) {
    clients.emplace_back([&] {
      httplib::Client c = client_of(t);
      for (int64_t i; (i = next.fetch_add(1)) < num;) {
        std::mt19937_64 rng(static_cast<uint64_t>(1000003 * concurrency + i));
        std::vector<int64_t> prompt(alphabet.size());
        for (auto& id : prompt) id = alphabet[rng() % alphabet.size()];
        const json body = {{"model", t.model}, {"prompt", prompt}, {"max_tokens", output_len}, {"ignore_eos", true},
                           {"temperature", 0}, {"stream", true}, {"stream_options", {{"include_usage", true}}}};
        results[static_cast<size_t>(i)] = one_request(c, body);
      }
    });
  }
  for (auto& c : clients) c.join();
  Level l;
  l.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::vector<double> ttft, tpot, itl, e2e;
  for (const Result& r : results) {
    if (!r.ok) {
      ++l.errors;
      if (l.first_error.empty()) l.first_error = r.error;
      continue;
    }
    ++l.ok;
    l.output_tokens += r.output_tokens;
    ttft.push_back(1e3 * r.ttft);
    e2e.push_back(1e3 * r.e2e);
    if (r.output_tokens > 1) tpot.push_back(1e3 * (r.e2e - r.ttft) / static_cast<double>(r.output_tokens - 1));
    for (double x : r.itl) itl.push_back(1e3 * x);
  }
  l.ttft = percentiles(ttft);
  l.tpot = percentiles(tpot);
  l.itl = percentiles(itl);
  l.e2e = percentiles(e2e);
  return l;
}

std::string cell(const Percentiles& p) {
  char b[96];
  std::snprintf(b, sizeof b, "%.1f/%.1f/%.1f/%.1f", p.mean, p.p50, p.p90, p.p99);
  return b;
}

}  // namespace

int bench_serve(const ParsedArgs& args, World* /*world*/) {
  Target t = parse_url(args.get("url", "http://127.0.0.1:8000"));
  const std::vector<int64_t> levels = parse_positive_list(args.get("concurrency", "1,8,32"), "concurrency");
  const int64_t input_len = args.get_int("input_len", 128), output_len = args.get_int("output_len", 128);
  const int64_t num_prompts = args.get_int("num_prompts", 64);
  ANDY_USER_CHECK(input_len >= 1 && output_len >= 1 && num_prompts >= 1,
                  "andyllm bench serve: --input_len, --output_len and --num_prompts must be >= 1");
  httplib::Client c = client_of(t);
  t.model = get_json(c, "/v1/models")["data"][0]["id"].get<std::string>();
  const std::vector<int64_t> alphabet = text_tokens(c, t, input_len);
  run_level(t, alphabet, 1, 1, 4);  // warm-up, not reported
  std::printf("# bench serve: http://%s:%d model %s, %lld prompts of %lld tokens, %lld output tokens each "
              "(ms: mean/p50/p90/p99)\n", t.host.c_str(), t.port, t.model.c_str(), (long long)num_prompts,
              (long long)input_len, (long long)output_len);
  std::printf("%4s %7s %9s %25s %21s %21s %27s %4s\n", "conc", "req/s", "out tok/s", "TTFT", "TPOT", "ITL", "E2E", "err");
  int64_t errors = 0;
  for (int64_t conc : levels) {
    const Level l = run_level(t, alphabet, conc, num_prompts, output_len);
    std::printf("%4lld %7.2f %9.1f %25s %21s %21s %27s %4lld\n", (long long)conc, l.ok / l.seconds,
                l.output_tokens / l.seconds, cell(l.ttft).c_str(), cell(l.tpot).c_str(), cell(l.itl).c_str(),
                cell(l.e2e).c_str(), (long long)l.errors);
    if (!l.first_error.empty()) std::printf("#   first error: %s\n", l.first_error.c_str());
    std::fflush(stdout);
    errors += l.errors;
  }
  return errors == 0 ? 0 : 1;
}

}  // namespace andy
