// `andyllm serve` end to end: the real executable (one rank, and two ranks under mpirun) serving
// a model trained here, driven over HTTP on 127.0.0.1 by a C++ client (cpp-httplib) on the port
// the server printed. Greedy API output equals `andyllm generate`; streamed text equals the
// whole response; errors are OpenAI error objects; a client that disconnects has its request
// cancelled and its KV blocks freed; SIGTERM (SIGUSR1 through mpirun) drains and every rank
// exits 0.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>
#include <thread>

#include "tests/data/data_test_util.h"
#include "tests/launch/job.h"
#include "tests/launch/run_command.h"
#include "tests/serve/serve_test_util.h"

using namespace andy::testing_util;
namespace dt = andy::data::testing;
using json = nlohmann::json;

namespace {

// A server started by a test, stopped (SIGTERM, or SIGUSR1 to mpirun) by it.
struct Server {
  std::unique_ptr<Job> job;
  int port = -1;

  // `env`: assignments put before the command, e.g. "ANDYLLM_FAILPOINTS=serve.request:1".
  Server(const std::string& args, const std::string& log, int ranks, const std::string& env = "") {
    const std::string launcher = (env.empty() ? "" : "env " + env + " ") + (ranks == 1 ? "" : mpirun(ranks));
    job = std::make_unique<Job>(launcher + andyllm_bin() + " serve --port 0 " + args, log);
    port = wait_for_server_port(*job, 120);
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(120, 0);
    return c;
  }
  // Asks the server to stop (SIGUSR1 reaches the ranks through mpirun at once); its exit code.
  int stop(int signal = SIGTERM) {
    if (job->pid <= 0) return job->exit_code();
    kill(job->pid, signal);
    if (!job->wait_exit(120)) return -1;
    return job->exit_code();
  }
};

json post_json(const Server& s, const std::string& path, const json& body, int* status,
               const httplib::Headers& headers = {}) {
  auto c = s.client();
  auto res = c.Post(path.c_str(), headers, body.dump(), "application/json");
  if (!res) {
    *status = -1;
    return nullptr;
  }
  *status = res->status;
  EXPECT_EQ(res->get_header_value("Content-Type").rfind("application/json", 0), 0u) << path << " " << res->body;
  return json::parse(res->body, nullptr, false);
}

// The "data: X" payloads of an SSE body, in order.
std::vector<std::string> sse_payloads(const std::string& body) {
  std::vector<std::string> events;
  for (size_t pos = 0; (pos = body.find("data: ", pos)) != std::string::npos;) {
    const size_t end = body.find("\n\n", pos);
    events.push_back(body.substr(pos + 6, end - pos - 6));
    pos = end;
  }
  return events;
}

// The events of a streamed response ("data: X" payloads, [DONE] included) on connection `c`;
// *status: the HTTP status, or minus httplib's error code when no response came.
std::vector<std::string> post_stream_on(httplib::Client& c, const std::string& path, const json& body, int* status) {
  std::string raw;
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    raw.append(d, n);
    return true;
  };
  auto res = c.send(req);
  *status = res ? res->status : -static_cast<int>(res.error());
  return sse_payloads(raw);
}
std::vector<std::string> post_stream(const Server& s, const std::string& path, const json& body, int* status) {
  auto c = s.client();
  return post_stream_on(c, path, body, status);
}

// Sends a streamed request and closes the connection at its first chunk (a client gone away).
void abandon_stream(const Server& s, const std::string& path, const json& body) {
  auto c = s.client();
  httplib::Request req;
  req.method = "POST";
  req.path = path;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  req.content_receiver = [](const char*, size_t, uint64_t, uint64_t) { return false; };
  c.send(req);
}

// The text of each choice, concatenated over stream chunks, and the finish reasons.
struct Streamed {
  std::map<int, std::string> text;
  std::map<int, std::vector<std::string>> finish;  // non-null finish_reason values per choice
  std::map<int, std::vector<json>> first_delta;
  json usage;
  bool done_last = false;
};
Streamed collect(const std::vector<std::string>& events, bool chat) {
  Streamed s;
  for (size_t i = 0; i < events.size(); ++i) {
    if (events[i] == "[DONE]") {
      s.done_last = i + 1 == events.size();
      continue;
    }
    json j = json::parse(events[i]);
    if (j.contains("usage")) s.usage = j["usage"];
    for (const json& c : j["choices"]) {
      const int idx = c["index"].get<int>();
      if (chat) {
        if (s.first_delta[idx].empty()) s.first_delta[idx].push_back(c["delta"]);
        if (c["delta"].contains("content")) s.text[idx] += c["delta"]["content"].get<std::string>();
      } else {
        s.text[idx] += c["text"].get<std::string>();
      }
      if (!c["finish_reason"].is_null()) s.finish[idx].push_back(c["finish_reason"].get<std::string>());
    }
  }
  return s;
}

// Scheduling policy of each thread of a process (/proc/PID/task/TID/stat, field 41), by tid.
std::map<pid_t, int> thread_policies(pid_t pid) {
  std::map<pid_t, int> out;
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    std::ifstream f(e.path() / "stat");
    std::string line;
    if (!std::getline(f, line) || line.rfind(')') == std::string::npos) continue;
    std::istringstream rest(line.substr(line.rfind(')') + 2));
    std::vector<std::string> fields{std::istream_iterator<std::string>(rest), {}};
    if (fields.size() > 38) out[static_cast<pid_t>(std::stol(e.path().filename().string()))] = std::stoi(fields[38]);
  }
  return out;
}

// A metric's value in /metrics text: the first sample of that name whose labels contain `label`.
double metric(const Server& s, const std::string& name, const std::string& label = "") {
  auto c = s.client();
  auto res = c.Get("/metrics");
  if (!res) return -1;
  std::regex re("\n" + name + R"(\{[^}]*)" + label + R"([^}]*\} ([0-9.eE+-]+))");
  std::smatch m;
  const std::string body = "\n" + res->body;
  if (!std::regex_search(body, m, re)) return -2;
  return std::stod(m[1]);
}

class ServeE2e : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new dt::TempDir("andyllm-serve-e2e");
    prepare_tiny_corpus(dir_->path());
    train_tiny(dir_->path(), "tp1", 1);
    server_ = new Server("--model " + model() + " --served_model_name tiny --max_request_bytes 65536",
                         path("server.log"), 1);
    ASSERT_GT(server_->port, 0) << server_->job->output();
  }
  static void TearDownTestSuite() {
    if (server_) {
      const int code = server_->stop(SIGTERM);
      EXPECT_EQ(code, 0) << "the server did not exit 0 on SIGTERM:\n" << server_->job->output();
    }
    delete server_;
    delete dir_;
  }
  static std::string path(const std::string& p) { return *dir_ / p; }
  static std::string model() { return path("tp1/best_model"); }

  // `andyllm generate` greedy output for `prompt` (one JSON line) on `ranks` ranks.
  static json generate(const std::string& prompt, int max_tokens, int ranks) {
    auto r = run_command(mpirun(ranks) + andyllm_bin() + " generate --model " + model() + " --prompt '" + prompt +
                         "' --max_tokens " + std::to_string(max_tokens) + " --temperature 0 --ignore_eos --output " +
                         path("gen.jsonl"));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return json::parse(dt::read_text(path("gen.jsonl")));
  }

  static dt::TempDir* dir_;
  static Server* server_;
};
dt::TempDir* ServeE2e::dir_ = nullptr;
Server* ServeE2e::server_ = nullptr;

TEST_F(ServeE2e, HealthModelsTokenize) {
  auto c = server_->client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  json models = json::parse(m->body);
  EXPECT_EQ(models["data"][0]["id"], "tiny");
  EXPECT_EQ(models["data"][0]["max_model_len"], 64);
  int status = 0;
  json t = post_json(*server_, "/tokenize", {{"prompt", "the cat sat"}}, &status);
  ASSERT_EQ(status, 200) << t;
  EXPECT_EQ(t["count"].get<size_t>(), t["tokens"].size());
  EXPECT_EQ(t["max_model_len"], 64);
  json d = post_json(*server_, "/detokenize", {{"tokens", t["tokens"]}}, &status);
  ASSERT_EQ(status, 200) << d;
  EXPECT_EQ(d["prompt"], "the cat sat");
}

TEST_F(ServeE2e, GreedyCompletionEqualsGenerate) {
  const json ref = generate("a quick brown fox", 12, 1);
  int status = 0;
  json r = post_json(*server_, "/v1/completions",
                     {{"model", "tiny"}, {"prompt", "a quick brown fox"}, {"max_tokens", 12}, {"temperature", 0},
                      {"ignore_eos", true}, {"user", "test"}},
                     &status);
  ASSERT_EQ(status, 200) << r;
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["choices"][0]["text"], ref["text"]);
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r["usage"]["prompt_tokens"], ref["prompt_tokens"]);
  EXPECT_EQ(r["usage"]["completion_tokens"], 12);
  EXPECT_EQ(r["usage"]["total_tokens"], ref["prompt_tokens"].get<int>() + 12);
  // The same prompt as token ids, and echo.
  json ids = post_json(*server_, "/tokenize", {{"prompt", "a quick brown fox"}}, &status)["tokens"];
  json r2 = post_json(*server_, "/v1/completions",
                      {{"prompt", ids}, {"max_tokens", 12}, {"temperature", 0}, {"ignore_eos", true}, {"echo", true}},
                      &status);
  ASSERT_EQ(status, 200) << r2;
  EXPECT_EQ(r2["choices"][0]["text"], "a quick brown fox" + ref["text"].get<std::string>());
}

TEST_F(ServeE2e, SeveralPromptsNSeedAndLogprobs) {
  int status = 0;
  const json body = {{"prompt", {"the cat", "river"}}, {"max_tokens", 5}, {"n", 2}, {"seed", 11},
                     {"temperature", 0.9}, {"ignore_eos", true}, {"logprobs", 2}};
  json a = post_json(*server_, "/v1/completions", body, &status);
  ASSERT_EQ(status, 200) << a;
  json b = post_json(*server_, "/v1/completions", body, &status);
  ASSERT_EQ(a["choices"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    EXPECT_EQ(a["choices"][i]["index"], i);
    EXPECT_EQ(a["choices"][i]["text"], b["choices"][i]["text"]) << "a seeded request is repeatable";
    const json& lp = a["choices"][i]["logprobs"];
    EXPECT_EQ(lp["tokens"].size(), 5u);
    EXPECT_EQ(lp["token_logprobs"].size(), 5u);
    EXPECT_EQ(lp["text_offset"].size(), 5u);
    EXPECT_LE(lp["top_logprobs"][0].size(), 2u);
  }
  EXPECT_EQ(a["usage"]["completion_tokens"], 20);
}

TEST_F(ServeE2e, StreamedTextEqualsWholeText) {
  const std::vector<json> bodies = {
      {{"prompt", "the cat"}, {"max_tokens", 20}, {"temperature", 0}, {"ignore_eos", true}},
      {{"prompt", "a red tree"}, {"max_tokens", 16}, {"n", 2}, {"seed", 5}, {"temperature", 1.0}, {"ignore_eos", true}},
      {{"prompt", "river"}, {"max_tokens", 10}, {"temperature", 0}, {"echo", true}, {"logprobs", 1}},
  };
  for (const json& body : bodies) {
    int status = 0;
    json whole = post_json(*server_, "/v1/completions", body, &status);
    ASSERT_EQ(status, 200) << whole;
    json sb = body;
    sb["stream"] = true;
    sb["stream_options"] = {{"include_usage", true}};
    auto events = post_stream(*server_, "/v1/completions", sb, &status);
    ASSERT_EQ(status, 200);
    Streamed s = collect(events, false);
    EXPECT_TRUE(s.done_last) << "[DONE] ends the stream";
    for (const json& c : whole["choices"]) {
      const int i = c["index"].get<int>();
      EXPECT_EQ(s.text[i], c["text"].get<std::string>()) << body;
      ASSERT_EQ(s.finish[i].size(), 1u) << "exactly one finish_reason per choice";
      EXPECT_EQ(s.finish[i][0], c["finish_reason"]);
    }
    EXPECT_EQ(s.usage, whole["usage"]);
  }
}

TEST_F(ServeE2e, StopStringsCutTheTextInBothModes) {
  int status = 0;
  const json base = {{"prompt", "the dog"}, {"max_tokens", 24}, {"temperature", 0}, {"ignore_eos", true}};
  const std::string full = post_json(*server_, "/v1/completions", base, &status)["choices"][0]["text"];
  ASSERT_GE(full.size(), 8u);
  const std::string stop = full.substr(full.size() / 2, 2);  // may start inside one token, end in another
  const std::string expect = full.substr(0, full.find(stop));
  for (bool stream : {false, true}) {
    json b = base;
    b["stop"] = json::array({stop, "never-generated"});
    if (stream) {
      b["stream"] = true;
      Streamed s = collect(post_stream(*server_, "/v1/completions", b, &status), false);
      EXPECT_EQ(s.text[0], expect) << "stop " << json(stop);
      ASSERT_EQ(s.finish[0].size(), 1u);
      EXPECT_EQ(s.finish[0][0], "stop");
    } else {
      json r = post_json(*server_, "/v1/completions", b, &status);
      EXPECT_EQ(r["choices"][0]["text"], expect) << "stop " << json(stop);
      EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
      b["include_stop_str_in_output"] = true;
      r = post_json(*server_, "/v1/completions", b, &status);
      EXPECT_EQ(r["choices"][0]["text"], expect + stop);
    }
  }
}

TEST_F(ServeE2e, ChatCompletionsWholeAndStreamed) {
  int status = 0;
  const json body = {{"model", "tiny"},
                     {"messages", {{{"role", "system"}, {"content", "Be brief."}}, {{"role", "user"}, {"content", "the cat"}}}},
                     {"max_completion_tokens", 8}, {"temperature", 0}, {"ignore_eos", true},
                     {"logprobs", true}, {"top_logprobs", 2}};
  json whole = post_json(*server_, "/v1/chat/completions", body, &status);
  ASSERT_EQ(status, 200) << whole;
  EXPECT_EQ(whole["object"], "chat.completion");
  EXPECT_EQ(whole["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(whole["choices"][0]["finish_reason"], "length");
  const json& content = whole["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 8u);
  EXPECT_TRUE(content[0].contains("token") && content[0].contains("logprob") && content[0].contains("bytes"));
  EXPECT_EQ(content[0]["top_logprobs"].size(), 2u);
  // The prompt is the documented template.
  json tok = post_json(*server_, "/tokenize", {{"prompt", "<|system|>\nBe brief.\n<|user|>\nthe cat\n<|assistant|>\n"}}, &status);
  EXPECT_EQ(whole["usage"]["prompt_tokens"], tok["count"]);
  json sb = body;
  sb["stream"] = true;
  sb["stream_options"] = {{"include_usage", true}};
  auto events = post_stream(*server_, "/v1/chat/completions", sb, &status);
  Streamed s = collect(events, true);
  ASSERT_FALSE(s.first_delta[0].empty());
  EXPECT_EQ(s.first_delta[0][0]["role"], "assistant") << "the first chunk carries the role";
  EXPECT_EQ(s.text[0], whole["choices"][0]["message"]["content"]);
  EXPECT_EQ(s.finish[0], std::vector<std::string>{"length"});
  EXPECT_EQ(s.usage, whole["usage"]);
  EXPECT_TRUE(s.done_last);
  EXPECT_NE(events.front().find("chat.completion.chunk"), std::string::npos);
}

TEST_F(ServeE2e, ErrorsAreOpenAiErrorObjects) {
  struct Case {
    std::string what, path, body;
    int status;
    std::string param, message_part;
  };
  std::string big(100000, 'x');
  const std::vector<Case> cases = {
      {"invalid JSON", "/v1/completions", "{bad", 400, "", "invalid JSON"},
      {"suffix", "/v1/completions", R"({"prompt": "a", "suffix": "b"})", 400, "suffix", "suffix"},
      {"temperature out of range", "/v1/completions", R"({"prompt": "a", "temperature": -2})", 400, "temperature", "temperature"},
      {"stream_options without stream", "/v1/completions", R"({"prompt": "a", "stream_options": {"include_usage": true}})", 400, "stream_options", "stream"},
      {"unknown model", "/v1/completions", R"({"prompt": "a", "model": "gpt-9"})", 404, "model", "does not exist"},
      {"over the context", "/v1/completions", R"({"prompt": "the cat", "max_tokens": 100})", 400, "prompt",
       "This model's maximum context length is 64 tokens. However, you requested"},
      {"no messages", "/v1/chat/completions", R"({"model": "tiny"})", 400, "messages", "messages"},
      {"body over max_request_bytes", "/v1/completions", R"({"prompt": ")" + big + R"("})", 413, "", ""},
  };
  auto c = server_->client();
  for (const Case& k : cases) {
    auto res = c.Post(k.path.c_str(), k.body, "application/json");
    ASSERT_TRUE(res) << k.what;
    EXPECT_EQ(res->status, k.status) << k.what << ": " << res->body;
    EXPECT_EQ(res->get_header_value("Content-Type"), "application/json") << k.what;
    json e = json::parse(res->body, nullptr, false);
    ASSERT_TRUE(e.is_object() && e.contains("error")) << k.what << ": " << res->body;
    for (const char* f : {"message", "type", "param", "code"}) EXPECT_TRUE(e["error"].contains(f)) << k.what << " " << f;
    if (!k.param.empty()) {
      EXPECT_EQ(e["error"]["param"], k.param) << k.what;
    }
    EXPECT_NE(e["error"]["message"].get<std::string>().find(k.message_part), std::string::npos) << k.what << ": " << res->body;
  }
  auto r = c.Get("/v1/nothing");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  EXPECT_TRUE(json::parse(r->body, nullptr, false).contains("error"));
  // The server keeps serving.
  int status = 0;
  post_json(*server_, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 2}}, &status);
  EXPECT_EQ(status, 200);
}

// 4 prompts x 128 completions of 56 tokens: a request that runs for seconds on the tiny model.
const json kLongRequest = {{"prompt", {"the cat", "a dog", "red tree", "river"}}, {"max_tokens", 56}, {"n", 128}, {"ignore_eos", true}};
constexpr int kLongChoices = 512;

// /health polled every 20 ms until the job exits (or `seconds` pass): whether it exited, and how
// many times it answered 200 after having answered something else (a status or no answer).
struct HealthWatch {
  bool exited = false;
  int ok_after_not_ok = 0;
};
template <typename Server>
HealthWatch watch_health_until_exit(Server& s, int seconds) {
  HealthWatch w;
  bool seen_not_ok = false;
  for (int i = 0; i < seconds * 50; ++i) {
    if (s.job->exited()) {
      w.exited = true;
      break;
    }
    httplib::Client c("127.0.0.1", s.port);
    c.set_connection_timeout(0, 200000);
    c.set_read_timeout(0, 500000);
    auto h = c.Get("/health");
    const bool ok = h && h->status == 200;
    if (!ok) seen_not_ok = true;
    else if (seen_not_ok) ++w.ok_after_not_ok;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return w;
}

// Waits until the server runs a request; false if none shows up.
bool wait_running(const Server& s) {
  for (int i = 0; i < 300; ++i) {
    if (metric(s, "vllm:num_requests_running") > 0) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

// Within `seconds`, nothing runs on `server` and every KV block is free again (its /metrics).
template <typename Server>
void expect_idle_within_seconds(Server& server, int seconds) {
  double running = 1, usage = 1;
  for (int i = 0; i < seconds * 10 && (running != 0 || usage != 0); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    running = metric(server, "vllm:num_requests_running");
    usage = metric(server, "vllm:kv_cache_usage_perc");
  }
  EXPECT_EQ(running, 0);
  EXPECT_EQ(usage, 0);
}

TEST_F(ServeE2e, ADisconnectedStreamIsCancelledAndItsBlocksFreed) {
  const double aborted0 = metric(*server_, "vllm:request_success_total", "finished_reason=\"abort\"");
  auto c = server_->client();
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  json body = kLongRequest;
  body["stream"] = true;
  req.body = body.dump();
  req.set_header("Content-Type", "application/json");
  int chunks = 0;
  std::string raw;
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    raw.append(d, n);
    return ++chunks < 2;  // goes away after two chunks
  };
  c.send(req);
  ASSERT_EQ(raw.find("[DONE]"), std::string::npos);
  // Within a few engine steps nothing runs and every KV block is free again.
  expect_idle_within_seconds(*server_, 10);
  EXPECT_EQ(metric(*server_, "vllm:request_success_total", "finished_reason=\"abort\"") - aborted0, kLongChoices)
      << "the stream's completions were cancelled, not run to the end";
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
}

// A client on a raw socket with a small receive buffer that sends a streamed request and reads
// nothing until read_all().
struct StalledStream {
  int fd = -1;
  StalledStream(int port, const json& body) {
    fd = socket(AF_INET, SOCK_STREAM, 0);
    const int small = 4096;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
    const std::string b = body.dump();
    const std::string req = "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                            "Connection: close\r\nContent-Length: " + std::to_string(b.size()) + "\r\n\r\n" + b;
    EXPECT_EQ(send(fd, req.data(), req.size(), 0), static_cast<ssize_t>(req.size()));
  }
  ~StalledStream() { close(fd); }
  // Reads the response to its end; returns its "data: " payloads (the chunked body decoded), or
  // the whole response when it is not a stream (an error).
  std::vector<std::string> read_all() {
    timeval tv{60, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    std::string raw;
    char buf[65536];
    for (ssize_t n; (n = recv(fd, buf, sizeof(buf), 0)) > 0;) raw.append(buf, static_cast<size_t>(n));
    std::string body;
    size_t pos = raw.find("\r\n\r\n");
    if (pos == std::string::npos || raw.substr(0, pos).find("chunked") == std::string::npos) return {raw};  // an error
    for (pos += 4; pos < raw.size();) {
      const size_t eol = raw.find("\r\n", pos);
      if (eol == std::string::npos) break;
      const size_t len = std::stoul(raw.substr(pos, eol - pos), nullptr, 16);
      if (len == 0) break;
      body += raw.substr(eol + 2, len);
      pos = eol + 2 + len + 2;
    }
    return sse_payloads(body);
  }
};

// The events of several streams go out from one thread (the waker) right after each engine
// step. A client that stops reading must hold up its own stream only: the other streams end
// with the right text, and the stalled stream, whose events the waker leaves to its handler
// thread once its socket is full, is whole and in order when its client reads again.
TEST_F(ServeE2e, AClientThatStopsReadingHoldsUpOnlyItsOwnStream) {
  // Room for every sequence at once: the stalled request's and the others' events come out of
  // the same steps.
  Server s("--model " + model() + " --max_num_seqs 160", path("server_stall.log"), 1);
  ASSERT_GT(s.port, 0) << s.job->output();
  // 128 choices of 50 tokens with 20 top logprobs each: about 5 MB of events, more than the
  // socket buffers hold (4 MB at most here), so the writes for it block part-way.
  const json big = {{"prompt", {"the cat", "a dog"}}, {"max_tokens", 50}, {"n", 64}, {"logprobs", 20},
                    {"ignore_eos", true}, {"stream", true}};
  const json small = {{"prompt", "the cat sat"}, {"max_tokens", 40}, {"ignore_eos", true}, {"temperature", 0}};
  int whole_status = 0;
  const json whole = post_json(s, "/v1/completions", small, &whole_status);
  ASSERT_EQ(whole_status, 200) << whole;
  StalledStream stalled(s.port, big);
  // Four streams at the same time (more than the two a step's end wakes directly: the stalled
  // stream's events go through the waker thread too) run to their end while it stalls.
  std::vector<std::thread> others;
  std::vector<Streamed> got(4);
  std::vector<int> status(4, 0);
  for (size_t k = 0; k < got.size(); ++k)
    others.emplace_back([&, k] {
      json b = small;
      b["stream"] = true;
      got[k] = collect(post_stream(s, "/v1/completions", b, &status[k]), false);
    });
  for (auto& t : others) t.join();
  for (size_t k = 0; k < got.size(); ++k) {
    EXPECT_EQ(status[k], 200);
    EXPECT_TRUE(got[k].done_last);
    EXPECT_EQ(got[k].text[0], whole["choices"][0]["text"].get<std::string>()) << "stream " << k;
  }
  // The stalled stream, read now: every choice's 50 tokens, one finish_reason each, [DONE] last.
  const std::vector<std::string> events = stalled.read_all();
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back(), "[DONE]");
  std::map<int, int64_t> tokens;
  std::map<int, int> finishes;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json j = json::parse(events[i], nullptr, false);
    ASSERT_FALSE(j.is_discarded() || j.contains("error")) << events[i].substr(0, 300);
    for (const json& c : j["choices"]) {
      const int idx = c["index"].get<int>();
      if (c["logprobs"].is_object()) tokens[idx] += static_cast<int64_t>(c["logprobs"]["tokens"].size());
      if (!c["finish_reason"].is_null()) ++finishes[idx];
    }
  }
  ASSERT_EQ(tokens.size(), 128u);
  for (int idx = 0; idx < 128; ++idx) {
    EXPECT_EQ(tokens[idx], 50) << "choice " << idx;
    EXPECT_EQ(finishes[idx], 1) << "choice " << idx;
  }
  expect_idle_within_seconds(s, 10);
  EXPECT_EQ(s.stop(), 0) << s.job->output();
}

// An exception while writing a stream's events, on whichever thread writes them (the waker
// thread when a step updates several streams), ends that stream with an error event and [DONE].
TEST_F(ServeE2e, AnErrorWhileWritingSeveralStreamsEndsEachWithAnErrorEvent) {
  Server s("--model " + model(), path("server_stream_fault.log"), 1, "ANDYLLM_FAILPOINTS=serve.stream:1000");
  ASSERT_GT(s.port, 0) << s.job->output();
  // A non-streamed request keeps the engine busy, so that the streams sent meanwhile are
  // admitted together and their first tokens come out of the same step.
  int long_status = 0;
  std::thread busy([&] { post_json(s, "/v1/completions", kLongRequest, &long_status); });
  ASSERT_TRUE(wait_running(s));
  std::vector<std::thread> clients;
  std::vector<std::vector<std::string>> events(8);
  std::vector<int> status(8, 0);
  for (size_t k = 0; k < events.size(); ++k)
    clients.emplace_back([&, k] {
      events[k] = post_stream(s, "/v1/completions",
                              {{"prompt", "the cat"}, {"max_tokens", 8}, {"ignore_eos", true}, {"stream", true}}, &status[k]);
    });
  for (auto& t : clients) t.join();
  busy.join();
  EXPECT_EQ(long_status, 200);
  for (size_t k = 0; k < events.size(); ++k) {
    EXPECT_EQ(status[k], 200);
    ASSERT_GE(events[k].size(), 2u) << "stream " << k;
    EXPECT_EQ(events[k].back(), "[DONE]");
    const json err = json::parse(events[k][events[k].size() - 2], nullptr, false);
    EXPECT_EQ(err["error"]["code"], 500) << events[k][events[k].size() - 2];
  }
  expect_idle_within_seconds(s, 10);
  EXPECT_EQ(s.stop(), 0) << s.job->output();
}

TEST_F(ServeE2e, ANonStreamingClientThatGoesAwayIsCancelled) {
  const double aborted0 = metric(*server_, "vllm:request_success_total", "finished_reason=\"abort\"");
  auto c = server_->client();
  c.set_read_timeout(0, 200000);  // gives up after 0.2 s, while the request is being computed
  auto res = c.Post("/v1/completions", kLongRequest.dump(), "application/json");
  if (res) GTEST_SKIP() << "the long request finished within 0.2 s: nothing to cancel";
  expect_idle_within_seconds(*server_, 10);
  EXPECT_EQ(metric(*server_, "vllm:request_success_total", "finished_reason=\"abort\"") - aborted0, kLongChoices)
      << "every completion of the abandoned request was cancelled";
}

// SIGTERM drains: /health and new requests answer 503, the running request still completes,
// the server exits 0. A second SIGTERM while draining ends it at once.
TEST_F(ServeE2e, SigtermDrainsAndASecondSignalEndsAtOnce) {
  for (int signals : {1, 2}) {
    Server s("--model " + model(), path("server_drain" + std::to_string(signals) + ".log"), 1);
    ASSERT_GT(s.port, 0) << s.job->output();
    int status = 0;
    json whole;
    std::thread client([&] { whole = post_json(s, "/v1/completions", kLongRequest, &status); });
    ASSERT_TRUE(wait_running(s));
    kill(s.job->pid, SIGTERM);
    int health = 200;
    for (int i = 0; i < 200 && health == 200; ++i) {
      auto c = s.client();
      auto h = c.Get("/health");
      health = h ? h->status : -1;
      if (health == 200) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_EQ(health, 503) << "draining";
    int refused = 0;
    json e = post_json(s, "/v1/completions", {{"prompt", "a"}, {"max_tokens", 2}}, &refused);
    EXPECT_EQ(refused, 503) << e;
    if (signals == 2) kill(s.job->pid, SIGTERM);
    client.join();
    ASSERT_TRUE(s.job->wait_exit(120)) << s.job->output();
    if (signals == 1) {
      EXPECT_EQ(status, 200) << whole;
      EXPECT_EQ(whole["choices"].size(), static_cast<size_t>(kLongChoices));
      EXPECT_EQ(whole["choices"][kLongChoices - 1]["finish_reason"], "length");
      EXPECT_EQ(s.job->exit_code(), 0) << s.job->output();
    } else {
      EXPECT_NE(status, 200) << "the second signal did not end the drain";
      EXPECT_EQ(s.job->exit_code(), 128 + SIGTERM) << s.job->output();
    }
  }
}

// A worker rank killed: the job ends non-zero (and a client is not left hanging).
TEST_F(ServeE2e, AKilledRankEndsTheServer) {
  Server s("--model " + model(), path("server_kill.log"), 2);
  ASSERT_GT(s.port, 0) << s.job->output();
  int status = 0;
  std::thread client([&] { post_json(s, "/v1/completions", kLongRequest, &status); });
  ASSERT_TRUE(wait_running(s));
  std::vector<pid_t> ranks = children_of(s.job->pid);
  ASSERT_EQ(ranks.size(), 2u);
  ASSERT_EQ(kill(ranks.back(), SIGKILL), 0);
  const HealthWatch w = watch_health_until_exit(s, 60);
  ASSERT_TRUE(w.exited) << "the job still runs 60 s after a rank was killed:\n" << s.job->output();
  client.join();
  EXPECT_NE(s.job->exit_code(), 0) << s.job->output();
  EXPECT_NE(status, 200);
  EXPECT_EQ(w.ok_after_not_ok, 0) << "/health said 200 again after it had reported the failure";
}

// An exception while handling one request is a 500 (an OpenAI error object); one after a stream
// began is an error event followed by [DONE]; the server serves the next requests as before.
// The faults are failpoints (core/base/failpoint.h) armed through the environment.
TEST_F(ServeE2e, InternalErrorsAre500sAndTheServerKeepsServing) {
  Server s("--model " + model(), path("server_fault.log"), 1, "ANDYLLM_FAILPOINTS=serve.request:1,serve.stream:1");
  ASSERT_GT(s.port, 0) << s.job->output();
  int status = 0;
  json body = {{"prompt", "the cat"}, {"max_tokens", 8}, {"ignore_eos", true}};
  json e = post_json(s, "/v1/completions", body, &status);
  EXPECT_EQ(status, 500);
  EXPECT_EQ(e["error"]["type"], "internal_server_error") << e.dump();
  EXPECT_NE(e["error"]["message"].get<std::string>().find("failpoint serve.request"), std::string::npos) << e.dump();
  body["stream"] = true;
  const auto events = post_stream(s, "/v1/completions", body, &status);
  EXPECT_EQ(status, 200);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  const json err = json::parse(events[events.size() - 2], nullptr, false);
  EXPECT_EQ(err["error"]["code"], 500) << events[events.size() - 2];
  body.erase("stream");
  json r = post_json(s, "/v1/completions", body, &status);
  EXPECT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["usage"]["completion_tokens"], 8);
  expect_idle_within_seconds(s, 10);
  auto c = s.client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  EXPECT_EQ(s.stop(), 0) << s.job->output();
}

// The engine failing (an exception in a step, on two ranks): the open request gets an error, not
// a hang; /health never answers 200 once it has said otherwise; the job ends non-zero.
TEST_F(ServeE2e, AnEngineFailureEndsTheJobAndHealthStaysDown) {
  Server s("--model " + model(), path("server_engine_fault.log"), 2, "ANDYLLM_FAILPOINTS=engine.step:1");
  ASSERT_GT(s.port, 0) << s.job->output();
  int status = 0;
  json r;
  std::thread client([&] { r = post_json(s, "/v1/completions", {{"prompt", "the cat"}, {"max_tokens", 8}}, &status); });
  const HealthWatch w = watch_health_until_exit(s, 60);
  client.join();
  ASSERT_TRUE(w.exited) << "the job still runs 60 s after its engine failed:\n" << s.job->output();
  EXPECT_NE(s.job->exit_code(), 0) << s.job->output();
  EXPECT_NE(status, 200) << r.dump();
  if (status > 0) {
    EXPECT_NE(r["error"]["message"].get<std::string>().find("engine failed"), std::string::npos) << r.dump();
  }
  EXPECT_EQ(w.ok_after_not_ok, 0) << "/health said 200 again after it had reported the failure";
  EXPECT_NE(s.job->output().find("failpoint engine.step"), std::string::npos) << s.job->output();
}

// A short load: 24 concurrent clients, 4 requests each (prompts of several lengths, streaming
// and not, completions and chat, some streams abandoned after the first chunk): no unexpected
// error, every KV block free at the end, the token counters equal to what was asked and reported.
TEST_F(ServeE2e, ConcurrentMixedClientsLeaveNothingBehind) {
  const std::vector<std::string> prompts = {"the", "the cat sat on a mat", "a quick brown fox jumps over the lazy dog",
                                            "river flows down under the big blue tree in morning light"};
  std::vector<int> prompt_len;
  for (const auto& p : prompts) {
    int status = 0;
    prompt_len.push_back(post_json(*server_, "/tokenize", {{"prompt", p}}, &status)["count"].get<int>());
  }
  const double p0 = metric(*server_, "vllm:prompt_tokens_total");
  const double g0 = metric(*server_, "vllm:generation_tokens_total");
  auto engine_tokens = [&] {
    return metric(*server_, "andyllm:engine_prefill_step_tokens_total") +
           metric(*server_, "andyllm:engine_decode_step_tokens_total");
  };
  const double steps0 = metric(*server_, "andyllm:engine_steps_total"), computed0 = engine_tokens();
  std::atomic<int64_t> expected_prompt{0}, reported_completion{0};
  std::atomic<int> unexpected{0}, abandoned{0};
  std::vector<std::string> problems(24);
  std::vector<std::thread> clients;
  for (int t = 0; t < 24; ++t) {
    clients.emplace_back([&, t] {
      for (int k = 0; k < 4; ++k) {
        const int which = (t + k) % 4, kind = (t * 4 + k) % 6;
        const int max_tokens = std::min(4 + (t * 7 + k) % 20, 64 - prompt_len[which]);  // within the context
        json body = {{"max_tokens", max_tokens}, {"ignore_eos", (t + k) % 2 == 0}, {"seed", t}};
        std::string route = "/v1/completions";
        if (kind == 5) {
          route = "/v1/chat/completions";
          body["messages"] = {{{"role", "user"}, {"content", prompts[which % 2]}}};  // the template adds tokens
        } else {
          body["prompt"] = prompts[which];
          expected_prompt += prompt_len[which];
        }
        int status = 0;
        if (kind == 0 || kind == 1 || kind == 5) {  // whole responses
          json r = post_json(*server_, route, body, &status);
          if (status != 200) {
            ++unexpected;
            problems[t] = r.dump();
            continue;
          }
          if (kind == 5) expected_prompt += r["usage"]["prompt_tokens"].get<int64_t>();
          reported_completion += r["usage"]["completion_tokens"].get<int64_t>();
        } else if (kind == 4) {  // a stream abandoned after its first chunk
          body["stream"] = true;
          abandon_stream(*server_, route, body);
          ++abandoned;
        } else {  // streams read to the end
          body["stream"] = true;
          body["stream_options"] = {{"include_usage", true}};
          Streamed st = collect(post_stream(*server_, route, body, &status), false);
          if (status != 200 || !st.done_last || st.usage.is_null()) {
            ++unexpected;
            problems[t] = "stream: status " + std::to_string(status);
            continue;
          }
          reported_completion += st.usage["completion_tokens"].get<int64_t>();
        }
      }
    });
  }
  for (auto& c : clients) c.join();
  EXPECT_EQ(unexpected, 0);
  for (const auto& p : problems) EXPECT_TRUE(p.empty()) << p;
  double running = 1, usage = 1;
  for (int i = 0; i < 100 && (running != 0 || usage != 0); ++i) {
    running = metric(*server_, "vllm:num_requests_running");
    usage = metric(*server_, "vllm:kv_cache_usage_perc");
    if (running != 0 || usage != 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_EQ(running, 0);
  EXPECT_EQ(usage, 0) << "KV blocks still used after every request ended";
  EXPECT_EQ(metric(*server_, "vllm:num_requests_waiting"), 0);
  EXPECT_EQ(metric(*server_, "vllm:prompt_tokens_total") - p0, static_cast<double>(expected_prompt));
  const double generated = metric(*server_, "vllm:generation_tokens_total") - g0;
  EXPECT_GE(generated, static_cast<double>(reported_completion));
  // The HTTP threads that served streams run under SCHED_BATCH (they must not preempt the engine
  // thread); the main thread, which runs the engine at TP=1, keeps the default policy.
  {
    // The job is the server itself or a shell in front of it (its other child is Open MPI's orted).
    auto comm_of = [](pid_t pid) {
      std::ifstream f("/proc/" + std::to_string(pid) + "/comm");
      std::string c;
      std::getline(f, c);
      return c;
    };
    pid_t server_pid = server_->job->pid;
    if (comm_of(server_pid) != "andyllm")
      for (pid_t kid : children_of(server_pid))
        if (comm_of(kid) == "andyllm") server_pid = kid;
    ASSERT_EQ(comm_of(server_pid), "andyllm");
    const std::map<pid_t, int> policies = thread_policies(server_pid);
    int batch = 0;
    for (const auto& [tid, policy] : policies) batch += policy == SCHED_BATCH;
    EXPECT_GE(batch, 1) << "no HTTP thread under SCHED_BATCH";
    ASSERT_TRUE(policies.count(server_pid));
    EXPECT_EQ(policies.at(server_pid), SCHED_OTHER) << "the engine thread's policy";
  }
  // The engine's step counters: every sampled token but each request's last was computed again.
  EXPECT_GT(metric(*server_, "andyllm:engine_steps_total") - steps0, 0);
  EXPECT_GE(engine_tokens() - computed0, generated - 96);
  std::printf("  96 requests (%d abandoned): %lld prompt tokens, %g generated (%lld reported by finished ones)\n",
              abandoned.load(), static_cast<long long>(expected_prompt), generated,
              static_cast<long long>(reported_completion));
  auto c = server_->client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
}

// Resident memory of a process in bytes (/proc/PID/status VmRSS); 0 when it is gone.
int64_t rss_bytes(pid_t pid) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return std::stoll(line.substr(6)) * 1024;
  return 0;
}

// The load of the issue: 64 concurrent clients for ANDYLLM_LOAD_SECONDS (default 60) against a
// TP=2 server, mixing prompt and output lengths, completions and chat, whole and streamed
// responses, and streams abandoned after their first chunk. Zero unexpected errors; every KV
// block free at the end; the ranks' resident memory after the first quarter (the warm-up) grows
// by at most 10 % + 32 MiB; prompt_tokens_total grows by exactly the prompt tokens sent.
TEST_F(ServeE2e, SixtyFourClientsForAMinuteOnTwoRanks) {
  const char* env = std::getenv("ANDYLLM_LOAD_SECONDS");
  const int seconds = env ? std::max(4, std::atoi(env)) : 60;
  Server s("--model " + model(), path("server_load.log"), 2);
  ASSERT_GT(s.port, 0) << s.job->output();
  const std::vector<pid_t> ranks = children_of(s.job->pid);
  ASSERT_EQ(ranks.size(), 2u);
  const std::vector<std::string> prompts = {"the", "the cat sat on a mat", "a quick brown fox jumps over the lazy dog",
                                            "river flows down under the big blue tree in morning light on a sunny day"};
  std::vector<int> prompt_len;
  for (const auto& p : prompts) {
    int status = 0;
    prompt_len.push_back(post_json(s, "/tokenize", {{"prompt", p}}, &status)["count"].get<int>());
  }
  std::atomic<int64_t> expected_prompt{0}, requests{0}, abandoned{0};
  std::atomic<int> unexpected{0};
  std::mutex problem_mu;
  std::string first_problem;
  const auto start = std::chrono::steady_clock::now();
  const auto end = start + std::chrono::seconds(seconds);
  std::vector<int64_t> rss_warm(ranks.size(), 0);
  std::thread sampler([&] {
    std::this_thread::sleep_for(std::chrono::seconds(seconds / 4));
    for (size_t i = 0; i < ranks.size(); ++i) rss_warm[i] = rss_bytes(ranks[i]);
  });
  auto problem = [&](const std::string& what) {
    ++unexpected;
    std::lock_guard<std::mutex> lk(problem_mu);
    if (first_problem.empty()) first_problem = what;
  };
  std::vector<std::thread> clients;
  for (int t = 0; t < 64; ++t) {
    clients.emplace_back([&, t] {
      // One keep-alive connection per client, as the official clients do (a connection per
      // request would run the loopback out of ephemeral ports at this rate).
      httplib::Client conn("127.0.0.1", s.port);
      conn.set_keep_alive(true);
      conn.set_read_timeout(120, 0);
      auto post = [&](const std::string& route, const json& body, int* status) {
        auto res = conn.Post(route.c_str(), body.dump(), "application/json");
        *status = res ? res->status : -static_cast<int>(res.error());
        return res ? json::parse(res->body, nullptr, false) : json();
      };
      for (int k = 0; std::chrono::steady_clock::now() < end; ++k) {
        const int which = (t + k) % 4, kind = (t * 5 + k) % 7;
        const int max_tokens = std::min(2 + (t * 11 + k * 3) % 40, 64 - prompt_len[which]);
        json body = {{"max_tokens", max_tokens}, {"ignore_eos", (t + k) % 3 != 0}, {"seed", t * 1000 + k}};
        std::string route = "/v1/completions";
        if (kind == 6) {
          route = "/v1/chat/completions";
          body["messages"] = {{{"role", "user"}, {"content", prompts[which % 2]}}};
          body["max_tokens"] = 8;
        } else {
          body["prompt"] = prompts[which];
        }
        int status = 0;
        ++requests;
        if (kind <= 1 || kind == 6) {
          json r = post(route, body, &status);
          if (status != 200) {
            problem(route + ": " + std::to_string(status) + " " + r.dump());
            continue;
          }
          expected_prompt += r["usage"]["prompt_tokens"].get<int64_t>();
        } else if (kind == 2) {  // abandoned after the first chunk
          body["stream"] = true;
          abandon_stream(s, route, body);
          expected_prompt += prompt_len[which];
          ++abandoned;
        } else {
          body["stream"] = true;
          body["stream_options"] = {{"include_usage", true}};
          Streamed st = collect(post_stream_on(conn, route, body, &status), kind == 6);
          if (status != 200 || !st.done_last || st.usage.is_null()) {
            problem("stream: status " + std::to_string(status));
            continue;
          }
          expected_prompt += st.usage["prompt_tokens"].get<int64_t>();
        }
      }
    });
  }
  for (auto& c : clients) c.join();
  sampler.join();
  EXPECT_EQ(unexpected, 0) << first_problem;
  expect_idle_within_seconds(s, 20);
  EXPECT_EQ(metric(s, "vllm:num_requests_waiting"), 0);
  EXPECT_EQ(metric(s, "vllm:prompt_tokens_total"), static_cast<double>(expected_prompt));
  for (size_t i = 0; i < ranks.size(); ++i) {
    const int64_t now = rss_bytes(ranks[i]);
    std::printf("  rank %zu RSS: %.1f MiB after warm-up, %.1f MiB at the end\n", i, rss_warm[i] / 1048576.0,
                now / 1048576.0);
    EXPECT_GT(rss_warm[i], 0);
    EXPECT_LE(now, rss_warm[i] + rss_warm[i] / 10 + (32 << 20)) << "rank " << i << " kept growing";
  }
  std::printf("  %lld requests in %d s from 64 clients (%lld abandoned streams), %lld prompt tokens\n",
              static_cast<long long>(requests.load()), seconds, static_cast<long long>(abandoned.load()),
              static_cast<long long>(expected_prompt.load()));
  EXPECT_EQ(s.stop(SIGUSR1), 0) << s.job->output();
}

// echo + logprobs scores the prompt (vLLM's prompt logprobs; lm-evaluation-harness sends echo,
// logprobs and max_tokens 0 for log-likelihoods): one entry per prompt token, the first null;
// the score of a token appended to the prompt equals its logprob when it was generated (prefill
// and decode paths agree); streamed, the first chunk carries the prompt with its logprobs.
TEST_F(ServeE2e, EchoWithLogprobsScoresThePrompt) {
  int status = 0;
  const json ids = post_json(*server_, "/tokenize", {{"prompt", "the cat sat on the mat"}}, &status)["tokens"];
  ASSERT_GE(ids.size(), 3u);
  json r = post_json(*server_, "/v1/completions",
                     {{"prompt", ids}, {"echo", true}, {"logprobs", 2}, {"max_tokens", 0}}, &status);
  ASSERT_EQ(status, 200) << r.dump();
  const json& lp = r["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), ids.size()) << r.dump();
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  for (size_t i = 1; i < ids.size(); ++i) {
    EXPECT_LE(lp["token_logprobs"][i].get<double>(), 0.0);
    EXPECT_EQ(lp["top_logprobs"][i].size(), 2u) << i;
  }
  EXPECT_EQ(r["usage"]["completion_tokens"], 0);
  EXPECT_EQ(r["usage"]["prompt_tokens"], ids.size());
  EXPECT_EQ(r["choices"][0]["finish_reason"], "length");
  // The last prompt token forced as a generated one (logit_bias; logprobs are of the raw
  // distribution): the sampler's logprob equals the prompt scoring's.
  const json head(ids.begin(), ids.end() - 1);
  const std::string last = std::to_string(ids.back().get<int>());
  json forced = post_json(*server_, "/v1/completions",
                          {{"prompt", head}, {"max_tokens", 1}, {"temperature", 0}, {"logprobs", 0},
                           {"logit_bias", {{last, 100}}}}, &status);
  ASSERT_EQ(status, 200) << forced.dump();
  EXPECT_NEAR(forced["choices"][0]["logprobs"]["token_logprobs"][0].get<double>(),
              lp["token_logprobs"][ids.size() - 1].get<double>(), 1e-5);
  // The streamed form: the prompt and its logprobs in the first chunk, text as the whole one.
  auto events = post_stream(*server_, "/v1/completions",
                            {{"prompt", ids}, {"echo", true}, {"logprobs", 1}, {"max_tokens", 3}, {"temperature", 0},
                             {"stream", true}}, &status);
  ASSERT_EQ(status, 200);
  ASSERT_GE(events.size(), 2u);
  const json first = json::parse(events[0]);
  EXPECT_EQ(first["choices"][0]["logprobs"]["tokens"].size(), ids.size()) << events[0];
  json whole = post_json(*server_, "/v1/completions",
                         {{"prompt", ids}, {"echo", true}, {"logprobs", 1}, {"max_tokens", 3}, {"temperature", 0}}, &status);
  EXPECT_EQ(collect(events, false).text[0], whole["choices"][0]["text"].get<std::string>());
  json bad = post_json(*server_, "/v1/completions", {{"prompt", ids}, {"max_tokens", 0}}, &status);
  EXPECT_EQ(status, 400);
  EXPECT_EQ(bad["error"]["param"], "max_tokens");
}

// `andyllm bench serve` against the suite's server: a table row per concurrency, no errors; a
// server that is not there is a clear error (exit 2).
TEST_F(ServeE2e, BenchServeMeasuresTheServer) {
  auto r = run_command(andyllm_bin() + " bench serve --url http://127.0.0.1:" + std::to_string(server_->port) +
                       " --concurrency 1,3 --num_prompts 6 --input_len 8 --output_len 5");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("model tiny, 6 prompts of 8 tokens, 5 output tokens each"), std::string::npos) << r.output;
  std::regex row(R"(\n +3 +[0-9.]+ +[0-9.]+ .* +0\n)");
  EXPECT_TRUE(std::regex_search(r.output, row)) << r.output;
  expect_idle_within_seconds(*server_, 10);
  auto bad = run_command(andyllm_bin() + " bench serve --url http://127.0.0.1:1 --concurrency 1 --num_prompts 1");
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("is the server running at that --url?"), std::string::npos) << bad.output;
}

// scripts/bench_http_overhead.sh: a server of its own on a free port, bench serve, the server
// stopped, bench generate; one row per concurrency with both rates and their ratio.
TEST_F(ServeE2e, BenchHttpOverheadScriptComparesServeWithTheEngine) {
  auto r = run_command("NUM_PROMPTS=4 INPUT_LEN=8 OUTPUT_LEN=5 " + source_dir() + "/scripts/bench_http_overhead.sh " +
                       model() + " 1 1,2 1");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* c : {"1", "2"}) {
    std::regex row(std::string(R"(\n1 +)") + c + R"( +([0-9.]+) +([0-9.]+) +([0-9.]+)\n)");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(r.output, m, row)) << r.output;
    EXPECT_GT(std::stod(m[1]), 0) << r.output;
    EXPECT_GT(std::stod(m[2]), 0) << r.output;
    EXPECT_NEAR(std::stod(m[3]), std::stod(m[1]) / std::stod(m[2]), 0.001) << r.output;
  }
  auto bad = run_command(source_dir() + "/scripts/bench_http_overhead.sh " + path("no_such_model"));
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("no model directory"), std::string::npos) << bad.output;
}

// The official `openai` npm client (pinned in tests/serve/openai_node/package.json, installed by
// scripts/setup.sh into build/openai-node) runs tests/serve/openai_node/suite.mjs against the
// server: completions, chat, streaming with usage, stop strings, n, seed, logprobs, errors and
// an abandoned stream. Skipped when Node.js or the package is missing.
TEST_F(ServeE2e, OfficialOpenAiNodeClient) {
  namespace fs = std::filesystem;
  const std::string node_dir = (fs::path(andyllm_bin()).parent_path() / "openai-node").string();
  if (!fs::exists(node_dir + "/node_modules/openai/package.json") || run_command("node --version").exit_code != 0)
    GTEST_SKIP() << "the openai npm client is not installed in " << node_dir << " (scripts/setup.sh installs it)";
  fs::copy_file(source_dir() + "/tests/serve/openai_node/suite.mjs", node_dir + "/suite.mjs",
                fs::copy_options::overwrite_existing);
  auto r = run_command("cd " + node_dir + " && ANDYLLM_URL=http://127.0.0.1:" + std::to_string(server_->port) +
                       " ANDYLLM_MODEL=tiny node suite.mjs");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  std::printf("%s", r.output.c_str());
}

// Starts that cannot serve stop with one clear line and a non-zero exit, on every rank.
TEST_F(ServeE2e, BadStartsSayWhatIsWrong) {
  struct Case {
    std::string what, cmd, expect;
    int code;
  };
  const std::vector<Case> cases = {
      {"TP size other than the rank count", mpirun(2) + andyllm_bin() + " serve --model " + model() + " --tensor_parallel_size 4 --port 0",
       "--tensor_parallel_size 4 but the job has 2 rank(s)", 2},
      {"port in use", mpirun(2) + andyllm_bin() + " serve --model " + model() + " --port " + std::to_string(server_->port),
       "cannot listen on 127.0.0.1:" + std::to_string(server_->port), 2},
      {"missing model", andyllm_bin() + " serve --model " + path("no_such_model") + " --port 0", "no_such_model", 2},
  };
  for (const Case& c : cases) {
    auto r = run_command("timeout -s KILL 120 " + c.cmd);  // a server that starts after all is ended
    EXPECT_EQ(r.exit_code, c.code) << c.what << "\n" << r.output;
    EXPECT_EQ(count_of(r.output, c.expect), 1) << c.what << "\n" << r.output;
    EXPECT_EQ(r.output.find("MPI_ABORT"), std::string::npos) << c.what << "\n" << r.output;
  }
}

TEST_F(ServeE2e, MetricsUseVllmNamesAndCountWhatUsageReports) {
  const double p0 = metric(*server_, "vllm:prompt_tokens_total");
  const double g0 = metric(*server_, "vllm:generation_tokens_total");
  int status = 0;
  json r = post_json(*server_, "/v1/completions", {{"prompt", "big red house"}, {"max_tokens", 7}, {"ignore_eos", true}}, &status);
  ASSERT_EQ(status, 200);
  EXPECT_EQ(metric(*server_, "vllm:prompt_tokens_total") - p0, r["usage"]["prompt_tokens"].get<double>());
  EXPECT_EQ(metric(*server_, "vllm:generation_tokens_total") - g0, 7);
  for (const char* name : {"vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                           "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                           "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_count",
                           "vllm:e2e_request_latency_seconds_sum", "vllm:request_queue_time_seconds_count"})
    EXPECT_GE(metric(*server_, name), 0) << name;
}

TEST_F(ServeE2e, ApiKeyAndFullQueue) {
  Server s("--model " + model() + " --api_key secret --max_num_seqs 1 --max_waiting 1", path("server_key.log"), 1);
  ASSERT_GT(s.port, 0) << s.job->output();
  int status = 0;
  const json body = {{"prompt", "the cat"}, {"max_tokens", 40}, {"ignore_eos", true}};
  json e = post_json(s, "/v1/completions", body, &status);
  EXPECT_EQ(status, 401);
  EXPECT_EQ(e["error"]["type"], "authentication_error");
  post_json(s, "/v1/completions", body, &status, {{"Authorization", "Bearer wrong"}});
  EXPECT_EQ(status, 401);
  post_json(s, "/v1/completions", body, &status, {{"Authorization", "Bearer secret"}});
  EXPECT_EQ(status, 200);
  auto c = s.client();
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200) << "/health needs no key";
  auto m = c.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 200) << "/metrics needs no key";
  // One running, one waiting: the rest of 12 simultaneous requests are refused with 429.
  std::vector<int> codes(12, 0);
  std::vector<std::thread> threads;
  for (size_t i = 0; i < codes.size(); ++i)
    threads.emplace_back([&, i] { post_json(s, "/v1/completions", body, &codes[i], {{"Authorization", "Bearer secret"}}); });
  for (auto& t : threads) t.join();
  const int ok = static_cast<int>(std::count(codes.begin(), codes.end(), 200));
  const int busy = static_cast<int>(std::count(codes.begin(), codes.end(), 429));
  EXPECT_EQ(ok + busy, 12);
  EXPECT_GE(ok, 1);
  EXPECT_GE(busy, 1);
  std::printf("  12 simultaneous requests, max_waiting 1: %d served, %d refused with 429\n", ok, busy);
  EXPECT_EQ(s.stop(SIGTERM), 0) << s.job->output();
}

// Two ranks under mpirun: the same greedy text as `generate` at TP=1 and TP=2; SIGUSR1 to mpirun
// (what scripts/mpirun.sh sends on SIGTERM / Ctrl-C) drains a running stream and the job exits 0.
TEST_F(ServeE2e, TwoRanksServeTheSameTextAndDrainOnSignal) {
  const json ref1 = generate("the quick brown", 10, 1);
  const json ref2 = generate("the quick brown", 10, 2);
  EXPECT_EQ(ref1["token_ids"], ref2["token_ids"]);
  Server s("--model " + model() + " --tensor_parallel_size 2", path("server_tp2.log"), 2);
  ASSERT_GT(s.port, 0) << s.job->output();
  int status = 0;
  json r = post_json(s, "/v1/completions", {{"prompt", "the quick brown"}, {"max_tokens", 10}, {"temperature", 0}, {"ignore_eos", true}}, &status);
  ASSERT_EQ(status, 200) << r;
  EXPECT_EQ(r["choices"][0]["text"], ref1["text"]);
  // A long stream is running when the signal comes; it still finishes.
  std::atomic<bool> first_chunk{false};
  std::string raw;
  std::thread client([&] {
    auto c = s.client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.body = json({{"prompt", "the cat"}, {"max_tokens", 56}, {"temperature", 0}, {"ignore_eos", true}, {"stream", true}}).dump();
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
      raw.append(d, n);
      first_chunk = true;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // a slow reader keeps it running
      return true;
    };
    c.send(req);
  });
  for (int i = 0; i < 600 && !first_chunk; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  kill(s.job->pid, SIGUSR1);
  // From now on /health never says 200 (503 while draining, then nothing listens).
  bool saw_200_after = false;
  for (int i = 0; i < 5; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    auto c = s.client();
    auto h = c.Get("/health");
    if (h && h->status == 200 && i > 0) saw_200_after = true;
  }
  client.join();
  EXPECT_FALSE(saw_200_after);
  EXPECT_NE(raw.find("\"finish_reason\":\"length\""), std::string::npos) << "the running stream finished:\n" << raw;
  EXPECT_NE(raw.find("data: [DONE]"), std::string::npos);
  ASSERT_TRUE(s.job->wait_exit(120)) << s.job->output();
  EXPECT_EQ(s.job->exit_code(), 0) << s.job->output();
}

}  // namespace
