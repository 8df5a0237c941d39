// HTTP routes, streaming and metrics over the engine (see http_server.h).
#include "serve/http_server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <httplib.h>
#include <linux/sockios.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <cerrno>
#include <cstdlib>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include "core/base/error.h"
#include "core/base/failpoint.h"
#include "core/base/logging.h"

namespace andy::serve {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

int64_t unix_now() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(dump(error_body(e)), "application/json");
}

ApiError error_of(int status, const std::string& type, const std::string& message) {
  ApiError e;
  e.status = status;
  e.type = type;
  e.message = message;
  return e;
}

// The HTTP handler threads run under SCHED_BATCH: a handler woken for a token then waits for
// an idle core or the next tick instead of preempting the engine thread, whose step every
// stream waits for (with 32 streams, the wake-ups of one step preempted it several hundred times
// a second on 2 cores). A batch thread keeps its full share of the CPU. ANDYLLM_HTTP_SCHED_BATCH=0
// keeps the default policy, for comparison. Returns whether the policy was set.
bool handler_thread_policy() {
  const char* env = std::getenv("ANDYLLM_HTTP_SCHED_BATCH");
  if (env && std::string(env) == "0") return false;
  sched_param p{};
  p.sched_priority = 0;
  return pthread_setschedparam(pthread_self(), SCHED_BATCH, &p) == 0;
}

// An engine refusal (the request is checked before submit, so this is mostly a full queue).
ApiError refusal_error(const std::string& why) {
  if (why.find("waiting queue is full") != std::string::npos)
    return error_of(429, "rate_limit_error", "the server is busy: " + why + "; retry later");
  return error_of(400, "invalid_request_error", why);
}

// The address and port of a socket's end (getsockname / getpeername), or "" / -1.
std::pair<std::string, int> address_of(int fd, bool peer) {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  if ((peer ? getpeername(fd, reinterpret_cast<sockaddr*>(&a), &len) : getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len)) != 0)
    return {"", -1};
  char buf[INET6_ADDRSTRLEN] = {0};
  if (a.ss_family == AF_INET) {
    auto* in = reinterpret_cast<sockaddr_in*>(&a);
    inet_ntop(AF_INET, &in->sin_addr, buf, sizeof(buf));
    return {buf, ntohs(in->sin_port)};
  }
  if (a.ss_family == AF_INET6) {
    auto* in = reinterpret_cast<sockaddr_in6*>(&a);
    inet_ntop(AF_INET6, &in->sin6_addr, buf, sizeof(buf));
    return {buf, ntohs(in->sin6_port)};
  }
  return {"", -1};
}

// The first of this process's open file descriptors (/proc/self/fd) for which match(fd) holds;
// -1 when none does.
int first_open_fd(const std::function<bool(int)>& match) {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return -1;
  int found = -1;
  while (dirent* e = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(e->d_name, &end, 10);
    if (*end || end == e->d_name || !match(static_cast<int>(fd))) continue;
    found = static_cast<int>(fd);
    break;
  }
  closedir(dir);
  return found;
}

// The accepted socket that carries `req` (httplib does not hand it to handlers): the open
// socket whose peer is the request's remote address and whose own port is its local port; -1
// when none is found. Valid while the handler runs (httplib owns it).
int connection_fd(const httplib::Request& req) {
  return first_open_fd([&](int fd) {
    const auto peer = address_of(fd, true);
    return peer.second == req.remote_port && peer.first == req.remote_addr &&
           address_of(fd, false).second == req.local_port;
  });
}

// True when the client closed its end (an orderly EOF or a reset), without consuming data.
bool peer_closed(int fd) {
  char c;
  const ssize_t n = recv(fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
  return n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// Binds `svr` to host:port (port 0: any free one); returns the port, or -1. Debian's cpp-httplib
// is a compiled library whose listen() backlog is 5 (CPPHTTPLIB_LISTEN_BACKLOG): 32 clients
// connecting at once had SYNs dropped and retried after a second. listen() again on the bound
// socket raises it (Linux updates the backlog of a listening socket).
int bind_server(httplib::Server& svr, const std::string& host, int port) {
  const int bound = port == 0 ? svr.bind_to_any_port(host) : (svr.bind_to_port(host, port) ? port : -1);
  if (bound <= 0) return bound;
  const int fd = first_open_fd([&](int fd) {
    int listening = 0;
    socklen_t len = sizeof(listening);
    return getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0 && listening &&
           address_of(fd, false).second == bound;
  });
  if (fd >= 0) ::listen(fd, 1024);
  return bound;
}

// Listening sockets with SO_REUSEADDR only: httplib's default adds SO_REUSEPORT, with which a
// second server on a port already serving would bind too and silently share its connections.
void exclusive_port(httplib::Server& svr) {
  svr.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
}

// Runs svr.listen_after_bind() on a thread and returns once it listens (or has given up), so
// that a stop() right after cannot come before the listening starts (and be lost).
std::thread start_listening(httplib::Server& svr) {
  auto ended = std::make_shared<std::atomic<bool>>(false);
  std::thread t([&svr, ended] {
    svr.listen_after_bind();
    *ended = true;
  });
  while (!svr.is_running() && !*ended) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  return t;
}

// A Prometheus histogram with fixed buckets.
struct Histogram {
  std::vector<double> bounds;
  std::vector<int64_t> counts;  // per bucket (not cumulative), +Inf last
  double sum = 0;
  int64_t count = 0;
  explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size() + 1, 0) {}
  void observe(double x) {
    size_t i = std::lower_bound(bounds.begin(), bounds.end(), x) - bounds.begin();
    ++counts[i];
    sum += x;
    ++count;
  }
  void write(std::ostream& os, const std::string& name, const std::string& help, const std::string& labels) const {
    os << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
    int64_t cum = 0;
    for (size_t i = 0; i <= bounds.size(); ++i) {
      cum += counts[i];
      os << name << "_bucket{" << labels << ",le=\"";
      if (i < bounds.size()) {
        std::ostringstream le;  // shortest form ("0.1"), whatever precision `os` counts with
        le << bounds[i];
        os << le.str();
      } else {
        os << "+Inf";
      }
      os << "\"} " << cum << "\n";
    }
    os << name << "_sum{" << labels << "} " << sum << "\n" << name << "_count{" << labels << "} " << count << "\n";
  }
};

}  // namespace

// One HTTP request in flight: the engine requests it made and the updates they delivered.
struct Call {
  struct Item {
    size_t sub;  // which prompt
    RequestUpdate u;
    Clock::time_point at;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Item> inbox;
  std::string failure;  // the engine failed: every open call ends with this
  std::vector<int64_t> ids;  // engine request ids, one per prompt
  bool handler_turn = false;  // the waker left work to the handler thread (under mu)

  // A streaming call's writer: applies the inbox, renders the events and sends them. The waker
  // thread runs it right after an engine step (no handler wake-up per token); it returns false
  // when the handler thread has to go on (the stream ended, failed, the socket would block).
  // Set by the handler while it is in its content provider, whose DataSink it writes to;
  // writer_mu keeps one thread at a time in the stream's state. The handler also looks at the
  // inbox every 100 ms itself, so a stream never depends on the waker alone.
  std::mutex writer_mu;
  std::function<bool()> pump;

  // Wakes the handler thread to do what the waker did not.
  void wake_handler() {
    {
      std::lock_guard<std::mutex> lk(mu);
      handler_turn = true;
    }
    cv.notify_one();
  }
};

// The state of one call's choices as the updates are read (HTTP thread only).
struct CallOutput {
  struct Choice {
    std::unique_ptr<TextAssembler> text;
    std::vector<SampledToken> sampled;  // all of them (non-stream)
    std::string finish_reason;          // set once the choice is done
    bool started = false;               // a stream chunk (role / echo) went out
    Clock::time_point last_token;
  };
  // What one batch of updates changed in one choice.
  struct Delta {
    int64_t index;
    std::string text;
    std::vector<SampledToken> sampled;
    std::string finish_reason;  // "" while running
  };
  const ApiRequest* req = nullptr;
  std::vector<Choice> choices;
  std::vector<int64_t> prompt_tokens;    // per prompt (from the engine)
  std::vector<bool> sub_finished;        // the engine finished the prompt's request
  std::vector<bool> queue_seen;          // the prompt's queue time went into the histogram
  std::vector<std::vector<SampledToken>> prompt_scored;  // per prompt: echo + logprobs
  size_t done = 0;                       // choices with a finish_reason
  std::string error;                     // a refused prompt
  Clock::time_point start = Clock::now();
  bool first_token_seen = false;

  CallOutput(const ApiRequest* r, const TextCodec* codec) : req(r) {
    const size_t n = static_cast<size_t>(r->params.n);
    choices.resize(r->prompts.size() * n);
    for (auto& c : choices) c.text = std::make_unique<TextAssembler>(codec, r->stop, r->include_stop_str_in_output);
    prompt_tokens.resize(r->prompts.size(), 0);
    for (size_t i = 0; i < r->prompts.size(); ++i) prompt_tokens[i] = static_cast<int64_t>(r->prompts[i].size());
    sub_finished.resize(r->prompts.size(), false);
    queue_seen.resize(r->prompts.size(), false);
    prompt_scored.resize(r->prompts.size());
  }
  bool complete() const { return done == choices.size() || !error.empty(); }
  Usage usage() const {
    Usage u;
    for (int64_t p : prompt_tokens) u.prompt_tokens += p;
    for (const auto& c : choices) u.completion_tokens += c.text->num_tokens();
    return u;
  }
};

// Delivers the updates of an engine step to the calls that got them. Waking each handler from
// the engine thread costs a futex call there per stream and step (measured: 3.4 % of the engine
// thread at 32 streams, tiny model), on the path every token waits for. Inside a step the
// wake-ups are collected instead, and when there are more than a few, this thread delivers
// them: one futex call on the engine thread per step. For a stream it writes the events itself
// (Call::pump), instead of waking the stream's handler thread to do it: one thread woken per
// step rather than one per stream, on the cores the engine shares. Outside a step
// (cancellation, failure, shutdown) a wake-up is immediate.
class Waker {
 public:
  Waker() : thread_([this] { loop(); }) {}
  ~Waker() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  // Called by an update's callback after it filled the call's inbox.
  void wake(const std::shared_ptr<Call>& c) {
    if (!collecting_) {
      c->cv.notify_one();
      return;
    }
    for (const auto& p : collected_)
      if (p == c) return;
    collected_.push_back(c);
  }
  // Around Engine::step() on the engine thread: begin_step() / end_step(), or a Step in scope.
  struct Step {
    explicit Step(Waker& w) : w_(w) { w_.begin_step(); }
    ~Step() { w_.end_step(); }
    Step(const Step&) = delete;
    Step& operator=(const Step&) = delete;
    Waker& w_;
  };
  void begin_step() { collecting_ = true; }
  void end_step() {
    collecting_ = false;
    if (collected_.size() <= kInline) {  // a hop through this thread would only add latency
      for (const auto& c : collected_) c->cv.notify_one();
      collected_.clear();
      return;
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      queue_.insert(queue_.end(), collected_.begin(), collected_.end());
    }
    collected_.clear();
    cv_.notify_one();
  }

 private:
  static constexpr size_t kInline = 2;
  void loop() {
    std::vector<std::shared_ptr<Call>> batch;
    while (true) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_
        batch.swap(queue_);
      }
      for (const auto& c : batch) {
        bool written = false;
        {
          std::unique_lock<std::mutex> w(c->writer_mu, std::try_to_lock);  // held: the handler is at it
          written = w.owns_lock() && c->pump && c->pump();
        }
        if (!written) c->wake_handler();
      }
      batch.clear();
    }
  }
  static thread_local bool collecting_;
  std::vector<std::shared_ptr<Call>> collected_;  // engine thread only
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<Call>> queue_;
  bool stop_ = false;
  std::thread thread_;
};
thread_local bool Waker::collecting_ = false;

struct HttpServer::Impl {
  Engine* engine;
  TextCodec codec;
  HttpServerOptions opts;
  httplib::Server svr;
  std::thread listener;
  std::atomic<bool> serving{false}, draining{false}, failed{false};
  std::atomic<int64_t> serial{0};

  std::mutex live_mu;
  std::set<std::shared_ptr<Call>> live;
  Waker waker;

  // Metrics the engine does not count (guarded by metrics_mu).
  std::mutex metrics_mu;
  int64_t prompt_tokens_total = 0, generation_tokens_total = 0;
  std::map<std::string, int64_t> finished_by_reason;
  Histogram ttft{{0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0}};
  Histogram itl{{0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5}};
  Histogram e2e{{0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0}};
  Histogram queue{{0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0}};

  Impl(Engine* e, TextCodec c, HttpServerOptions o) : engine(e), codec(std::move(c)), opts(std::move(o)) {}

  // Serving, not draining, not failed, and no stop signal yet: /health 200, requests accepted.
  bool accepting() const { return serving && !draining && !failed && !(opts.unhealthy && opts.unhealthy()); }

  // ---- routes ----------------------------------------------------------------------------------
  void install_routes() {
    exclusive_port(svr);
    svr.set_payload_max_length(static_cast<size_t>(opts.max_request_bytes));
    // Keep-alive as uvicorn (vLLM's server) does it: idle connections close after 5 s, and a busy
    // one is not closed after a handful of requests (httplib's default of 5 makes clients
    // reconnect often, and a request sent as the server closes is lost).
    svr.set_keep_alive_timeout(5);
    // Each SSE event leaves at once: with Nagle's algorithm a small write waits for the ACK of
    // the previous one, which a client may delay by 40 ms (uvicorn sets TCP_NODELAY too).
    svr.set_tcp_nodelay(true);
    svr.set_keep_alive_max_count(100000);
    const int threads = opts.http_threads;
    svr.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
    svr.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      thread_local const bool batch_policy = handler_thread_policy();
      (void)batch_policy;
      if (opts.api_key.empty() || req.path.rfind("/v1/", 0) != 0) return httplib::Server::HandlerResponse::Unhandled;
      if (req.get_header_value("Authorization") == "Bearer " + opts.api_key)
        return httplib::Server::HandlerResponse::Unhandled;
      ApiError e = error_of(401, "authentication_error",
                            req.has_header("Authorization") ? "Incorrect API key provided." :
                            "Missing API key: send the header 'Authorization: Bearer KEY'.");
      e.code = "invalid_api_key";
      send_error(res, e);
      return httplib::Server::HandlerResponse::Handled;
    });
    svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      if (res.status == 404)
        send_error(res, error_of(404, "not_found_error", "no route " + req.method + " " + req.path));
      else if (res.status == 413)
        send_error(res, error_of(413, "invalid_request_error", "the request body is larger than serve.max_request_bytes"));
      else
        send_error(res, error_of(res.status, "invalid_request_error", "HTTP error " + std::to_string(res.status)));
    });
    svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "internal error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = std::string("internal error: ") + e.what();
      } catch (...) {
      }
      send_error(res, error_of(500, "internal_server_error", what));
    });
    svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      const bool ok = accepting();
      res.status = ok ? 200 : 503;
      res.set_content(ok ? "" : (failed ? "engine failed\n" : "not serving\n"), "text/plain");
    });
    svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      json m = {{"id", opts.protocol.model_id}, {"object", "model"}, {"created", unix_now()},
                {"owned_by", "andyllm"}, {"root", opts.protocol.model_id}, {"parent", nullptr},
                {"max_model_len", opts.protocol.max_model_len}};
      res.set_content(dump({{"object", "list"}, {"data", json::array({m})}}), "application/json");
    });
    svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics_text(), "text/plain; version=0.0.4");
    });
    svr.Post("/tokenize", [this](const httplib::Request& req, httplib::Response& res) { guarded(req, res, &Impl::tokenize); });
    svr.Post("/detokenize", [this](const httplib::Request& req, httplib::Response& res) { guarded(req, res, &Impl::detokenize); });
    svr.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [this, &req](const json& b, httplib::Response& r) { generate(req, b, r, Endpoint::kCompletions); });
    });
    svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      guarded(req, res, [this, &req](const json& b, httplib::Response& r) { generate(req, b, r, Endpoint::kChat); });
    });
  }

  // Parses the JSON body and runs `handler`; never throws.
  template <typename H>
  void guarded(const httplib::Request& req, httplib::Response& res, H handler) {
    try {
      if (!accepting()) {
        send_error(res, error_of(503, "service_unavailable", draining ? "the server is shutting down" : "the server is not serving"));
        return;
      }
      json body;
      try {
        body = json::parse(req.body);
      } catch (const json::exception& e) {
        send_error(res, error_of(400, "invalid_request_error", std::string("invalid JSON body: ") + e.what()));
        return;
      }
      if constexpr (std::is_member_function_pointer_v<H>) (this->*handler)(body, res);
      else handler(body, res);
    } catch (const std::exception& e) {
      log::error("http ", req.method, " ", req.path, ": ", e.what());
      send_error(res, error_of(500, "internal_server_error", std::string("internal error: ") + e.what()));
    } catch (...) {
      send_error(res, error_of(500, "internal_server_error", "internal error"));
    }
  }

  void tokenize(const json& body, httplib::Response& res) {
    if (!body.is_object()) return send_error(res, bad_param("", "the request body must be a JSON object"));
    if (body.contains("model") && body["model"] != opts.protocol.model_id) {
      ApiError e = bad_param("model", "The model `" + body["model"].dump() + "` does not exist.");
      e.status = 404;
      return send_error(res, e);
    }
    std::string text;
    if (body.contains("messages")) {
      if (auto e = apply_chat_template(body["messages"], opts.protocol.chat_template, &text)) return send_error(res, *e);
    } else if (body.contains("prompt") && body["prompt"].is_string()) {
      text = body["prompt"].get<std::string>();
    } else {
      return send_error(res, bad_param("prompt", "prompt: expected a string (or give messages)"));
    }
    const std::vector<int32_t> ids = codec.encode(text);
    res.set_content(dump({{"count", ids.size()}, {"max_model_len", opts.protocol.max_model_len}, {"tokens", ids}}),
                    "application/json");
  }

  void detokenize(const json& body, httplib::Response& res) {
    if (!body.is_object() || !body.contains("tokens") || !body["tokens"].is_array())
      return send_error(res, bad_param("tokens", "tokens: expected a list of token ids"));
    std::vector<int32_t> ids;
    for (const json& t : body["tokens"]) {
      if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= codec.vocab_size)
        return send_error(res, bad_param("tokens", "tokens: expected token ids in 0.." + std::to_string(codec.vocab_size - 1)));
      ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
    }
    res.set_content(dump({{"prompt", codec.decode(ids)}}), "application/json");
  }

  // ---- generation ------------------------------------------------------------------------------
  std::shared_ptr<Call> submit(const ApiRequest& r) {
    auto call = std::make_shared<Call>();
    {
      std::lock_guard<std::mutex> lk(live_mu);
      live.insert(call);
    }
    std::weak_ptr<Call> weak = call;
    for (size_t sub = 0; sub < r.prompts.size(); ++sub) {
      const int64_t id = engine->submit({r.prompts[sub], r.params}, [this, weak, sub](const RequestUpdate& u) {
        auto c = weak.lock();
        if (!c) return;
        {
          std::lock_guard<std::mutex> lk(c->mu);
          c->inbox.push_back({sub, u, Clock::now()});
        }
        // Outside the lock: the handler wakes to a free mutex (not a wake followed by a block
        // on the mutex the engine thread still holds).
        waker.wake(c);
      });
      std::lock_guard<std::mutex> lk(call->mu);
      call->ids.push_back(id);
    }
    return call;
  }

  // Cancels the engine requests of `out` that are still running and forgets the call.
  void end_call(const std::shared_ptr<Call>& call, CallOutput& out, bool count_abort) {
    std::vector<int64_t> ids;
    {
      std::lock_guard<std::mutex> lk(call->mu);
      ids = call->ids;
    }
    for (size_t sub = 0; sub < ids.size(); ++sub)
      if (!out.sub_finished[sub]) engine->cancel(ids[sub]);
    {
      std::lock_guard<std::mutex> lk(metrics_mu);
      const Usage u = out.usage();
      prompt_tokens_total += u.prompt_tokens;
      generation_tokens_total += u.completion_tokens;
      for (const auto& c : out.choices) ++finished_by_reason[c.finish_reason.empty() || count_abort ? "abort" : c.finish_reason];
      e2e.observe(seconds_between(out.start, Clock::now()));
    }
    std::lock_guard<std::mutex> lk(live_mu);
    live.erase(call);
  }

  // Waits up to `timeout` for updates (or the waker's hand-over); applies them to `out` and
  // returns the deltas.
  std::vector<CallOutput::Delta> next_deltas(Call& call, CallOutput& out, std::chrono::milliseconds timeout) {
    wait_for_updates(call, timeout);
    return take_deltas(call, out);
  }

  static void wait_for_updates(Call& call, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lk(call.mu);
    call.cv.wait_for(lk, timeout, [&] { return !call.inbox.empty() || !call.failure.empty() || call.handler_turn; });
    call.handler_turn = false;
  }

  // Applies the updates delivered so far to `out` (without waiting) and returns the deltas.
  std::vector<CallOutput::Delta> take_deltas(Call& call, CallOutput& out) {
    std::deque<Call::Item> items;
    {
      std::lock_guard<std::mutex> lk(call.mu);
      items.swap(call.inbox);
      if (!call.failure.empty() && out.error.empty()) out.error = call.failure;
    }
    std::vector<CallOutput::Delta> deltas;
    const int64_t n = out.req->params.n;
    for (Call::Item& it : items) {
      const RequestUpdate& u = it.u;
      if (!u.error.empty()) {
        if (out.error.empty()) out.error = u.error;
        out.sub_finished[it.sub] = true;
        continue;
      }
      if (u.request_finished) out.sub_finished[it.sub] = true;
      if (u.prompt_tokens > 0) out.prompt_tokens[it.sub] = u.prompt_tokens;
      if (!u.prompt_logprobs.empty()) out.prompt_scored[it.sub] = u.prompt_logprobs;
      if (u.queue_seconds >= 0 && !out.queue_seen[it.sub]) {
        out.queue_seen[it.sub] = true;
        std::lock_guard<std::mutex> lk(metrics_mu);
        queue.observe(u.queue_seconds);
      }
      const int64_t index = static_cast<int64_t>(it.sub) * n + u.index;
      CallOutput::Choice& c = out.choices[static_cast<size_t>(index)];
      if (!c.finish_reason.empty()) continue;  // ended by a stop string: the rest is ignored
      CallOutput::Delta d{index, "", {}, ""};
      for (size_t k = 0; k < u.new_tokens.size() && !c.text->stopped() && !out.req->prompt_only; ++k) {
        d.text += c.text->append({u.new_tokens[k]});
        if (k < u.new_sampled.size() && out.req->logprobs) d.sampled.push_back(u.new_sampled[k]);
      }
      if (!u.new_tokens.empty()) {
        std::lock_guard<std::mutex> lk(metrics_mu);
        if (!out.first_token_seen) ttft.observe(seconds_between(out.start, it.at));
        else if (c.last_token.time_since_epoch().count() != 0) itl.observe(seconds_between(c.last_token, it.at));
        out.first_token_seen = true;
        c.last_token = it.at;
      }
      if (c.text->stopped()) {
        d.finish_reason = "stop";
      } else if (u.finished) {
        d.text += c.text->finish();
        d.finish_reason = u.finish_reason.empty() ? "stop" : u.finish_reason;
      }
      if (!d.finish_reason.empty()) {
        c.finish_reason = d.finish_reason;
        ++out.done;
      }
      c.sampled.insert(c.sampled.end(), d.sampled.begin(), d.sampled.end());
      if (!d.text.empty() || !d.sampled.empty() || !d.finish_reason.empty()) deltas.push_back(std::move(d));
    }
    // Every choice of a prompt ended by stop strings: its engine request is no longer needed.
    for (size_t sub = 0; sub < out.sub_finished.size(); ++sub) {
      if (out.sub_finished[sub]) continue;
      bool all = true;
      for (int64_t k = 0; k < n; ++k) all = all && !out.choices[sub * n + k].finish_reason.empty();
      if (all) {
        std::lock_guard<std::mutex> lk(call.mu);
        engine->cancel(call.ids[sub]);
        out.sub_finished[sub] = true;
      }
    }
    return deltas;
  }

  json logprobs_of(const ApiRequest& r, const std::vector<SampledToken>& s, int64_t offset) const {
    if (!r.logprobs) return nullptr;
    return r.endpoint == Endpoint::kChat ? chat_logprobs_json(s, codec) : completion_logprobs_json(s, codec, offset);
  }

  void generate(const httplib::Request& http, const json& body, httplib::Response& res, Endpoint endpoint) {
    auto req = std::make_shared<ApiRequest>();
    std::optional<ApiError> err = endpoint == Endpoint::kChat ? parse_chat_request(body, opts.protocol, codec, req.get())
                                                              : parse_completion_request(body, opts.protocol, codec, req.get());
    if (err) return send_error(res, *err);
    if (failpoint_fires("serve.request")) throw std::runtime_error("failpoint serve.request");
    if (engine->stats().num_waiting >= engine->options().max_waiting)
      return send_error(res, refusal_error("the engine's waiting queue is full (" +
                                           std::to_string(engine->options().max_waiting) + " requests)"));
    const std::string id = response_id(endpoint, serial.fetch_add(1) + 1);
    const int64_t created = unix_now();
    std::shared_ptr<Call> call = submit(*req);
    auto out = std::make_shared<CallOutput>(req.get(), &codec);
    if (!req->stream) return respond_whole(http, call, *out, *req, res, id, created);
    res.set_header("Cache-Control", "no-cache");
    const int fd = connection_fd(http);
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, call, out, req, id, created, fd](size_t, httplib::DataSink& sink) {
          return stream(call, *out, *req, sink, id, created, fd);
        },
        [this, call, out](bool) {
          // Ended or abandoned (a client that went away): nothing may keep running.
          if (live_contains(call)) end_call(call, *out, !out->complete());
        });
  }

  bool live_contains(const std::shared_ptr<Call>& call) {
    std::lock_guard<std::mutex> lk(live_mu);
    return live.count(call) > 0;
  }

  // Waits for the whole response; a client that goes away meanwhile (mid-prefill too) has its
  // requests cancelled.
  void respond_whole(const httplib::Request& http, const std::shared_ptr<Call>& call, CallOutput& out,
                     const ApiRequest& r, httplib::Response& res, const std::string& id, int64_t created) {
    const int fd = connection_fd(http);
    while (!out.complete()) {
      next_deltas(*call, out, std::chrono::milliseconds(100));
      if (fd >= 0 && !out.complete() && peer_closed(fd)) {
        end_call(call, out, true);
        return send_error(res, error_of(499, "client_closed_request", "the client closed the connection"));
      }
    }
    end_call(call, out, false);
    if (!out.error.empty()) return send_error(res, refusal_error(out.error));
    json choices = json::array();
    for (size_t i = 0; i < out.choices.size(); ++i) {
      const auto& c = out.choices[i];
      const size_t sub = i / static_cast<size_t>(r.params.n);
      const std::string echo = r.echo ? r.prompt_texts[sub] : "";
      // echo + logprobs: the prompt's tokens first (a prompt_only request generated none).
      const json lp = r.echo && r.logprobs && r.endpoint == Endpoint::kCompletions
                          ? echo_logprobs_json(r.prompts[sub], out.prompt_scored[sub], c.sampled, codec,
                                               static_cast<int64_t>(echo.size()))
                          : logprobs_of(r, c.sampled, static_cast<int64_t>(echo.size()));
      choices.push_back(r.endpoint == Endpoint::kChat ? chat_choice(i, c.text->text(), lp, c.finish_reason)
                                                      : completion_choice(i, echo + c.text->text(), lp, c.finish_reason));
    }
    json j = response_json(r.endpoint, id, created, opts.protocol.model_id, choices, false);
    j["usage"] = usage_json(out.usage());
    res.set_content(dump(j), "application/json");
  }

  // Writes one SSE event; false when the client is gone.
  static bool send_event(httplib::DataSink& sink, const std::string& data) {
    const std::string ev = "data: " + data + "\n\n";
    return sink.write(ev.data(), ev.size());
  }

  // The stream: role / echo chunks, then deltas as they come, usage, [DONE]. An exception after
  // the stream began becomes an error event followed by [DONE] (the status line is long gone).
  // `fd`: the connection's socket (-1: unknown), watched so that a client that goes away is
  // noticed at once, not only when a write fails.
  bool stream(const std::shared_ptr<Call>& call, CallOutput& out, const ApiRequest& r, httplib::DataSink& sink,
              const std::string& id, int64_t created, int fd) {
    try {
      return stream_events(call, out, r, sink, id, created, fd);
    } catch (const std::exception& e) {
      log::error("http stream ", id, ": ", e.what());
      if (live_contains(call)) end_call(call, out, true);
      json body = error_body(error_of(500, "internal_server_error", std::string("internal error: ") + e.what()));
      body["error"]["code"] = 500;
      if (!send_event(sink, dump(body)) || !send_event(sink, "[DONE]")) return false;
      sink.done();
      return true;
    }
  }

  // One stream's rendering state; used by the thread that holds Call::writer_mu.
  struct EventStream {
    std::string head, tail;    // a chunk is head + choice + tail
    std::string pending;       // events not yet written
    std::vector<int64_t> offsets;  // per choice: text offset (completion logprobs)
    Clock::time_point idle_since = Clock::now();
    bool gone = false;         // a write failed: the client went away
    std::exception_ptr failed;  // thrown on the waker thread, rethrown on the handler's

    void append_chunk(const json& choice) {
      pending += head;
      pending += dump(choice);
      pending += tail;
    }
  };

  // Renders `deltas` as chunks appended to es.pending.
  void render(EventStream& es, CallOutput& out, const ApiRequest& r, const std::vector<CallOutput::Delta>& deltas) {
    for (const auto& d : deltas) {
      if (!out.choices[d.index].started) {  // echo + logprobs: the prompt and its logprobs first
        out.choices[d.index].started = true;
        const size_t sub = static_cast<size_t>(d.index / r.params.n);
        es.append_chunk(completion_choice(d.index, r.prompt_texts[sub],
                                          echo_logprobs_json(r.prompts[sub], out.prompt_scored[sub], {}, codec, 0), ""));
      }
      const json lp = logprobs_of(r, d.sampled, es.offsets[d.index]);
      es.offsets[d.index] += static_cast<int64_t>(d.text.size());
      if (r.endpoint == Endpoint::kChat)
        es.append_chunk(chat_delta_choice(d.index, d.text.empty() ? json::object() : json{{"content", d.text}}, lp,
                                          d.finish_reason));
      else
        es.append_chunk(completion_choice(d.index, d.text, lp, d.finish_reason));
    }
  }

  static bool flush(EventStream& es, httplib::DataSink& sink) {
    const bool ok = es.pending.empty() || sink.write(es.pending.data(), es.pending.size());
    es.pending.clear();
    return ok;
  }

  // Applies the delivered updates and writes their events, with what an earlier call left
  // pending (Call::writer_mu held). kGone: the client went away. With `nonblocking_fd` >= 0 the
  // events are written only when they fit in that socket's send buffer now (kWouldBlock: they
  // stay pending, for the handler thread).
  enum class Wrote { kOk, kGone, kWouldBlock };
  Wrote write_updates(Call& call, CallOutput& out, const ApiRequest& r, EventStream& es, httplib::DataSink& sink,
                      int nonblocking_fd = -1) {
    const auto deltas = take_deltas(call, out);
    render(es, out, r, deltas);
    if (!es.pending.empty() && nonblocking_fd >= 0 && !fits_now(nonblocking_fd, es.pending.size())) return Wrote::kWouldBlock;
    if (!flush(es, sink)) return Wrote::kGone;
    if (!deltas.empty()) es.idle_since = Clock::now();
    if (!deltas.empty() && failpoint_fires("serve.stream")) throw std::runtime_error("failpoint serve.stream");
    return Wrote::kOk;
  }

  // True when `bytes` more can be written to socket `fd` without blocking: its send queue
  // (bytes not yet sent or not yet acknowledged) plus them stays within half its send buffer.
  // The kernel counts the buffer with its bookkeeping overhead, hence half. A client that stops
  // reading fills the queue, and its events are then written by its own handler thread, which
  // may block; the waker thread, which writes for every stream, must not.
  static bool fits_now(int fd, size_t bytes) {
    int queued = 0, sndbuf = 0;
    socklen_t len = sizeof(sndbuf);
    if (::ioctl(fd, SIOCOUTQ, &queued) != 0 || ::getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) != 0) return false;
    return static_cast<size_t>(queued) + bytes <= static_cast<size_t>(sndbuf) / 2;
  }

  bool stream_events(const std::shared_ptr<Call>& call, CallOutput& out, const ApiRequest& r, httplib::DataSink& sink,
                     const std::string& id, int64_t created, int fd) {
    // A chunk is the response object around one choice. Its keys dump sorted, "choices" first,
    // so the text around the choice is rendered once per stream; the events of one wake-up go
    // out in one write (one send, not one per token and choice).
    EventStream es;
    const std::string frame = dump(response_json(r.endpoint, id, created, opts.protocol.model_id, json::array(), true));
    const size_t cut = frame.find("[]");
    ANDY_CHECK(cut != std::string::npos && frame.rfind("{\"choices\":", 0) == 0, "stream chunk frame: ", frame);
    es.head = "data: " + frame.substr(0, cut + 1);
    es.tail = frame.substr(cut + 1) + "\n\n";
    es.offsets.assign(out.choices.size(), 0);
    for (size_t i = 0; i < out.choices.size(); ++i)
      if (r.echo) es.offsets[i] = static_cast<int64_t>(r.prompt_texts[i / r.params.n].size());
    {
      std::lock_guard<std::mutex> w(call->writer_mu);
      for (size_t i = 0; i < out.choices.size(); ++i) {
        if (out.choices[i].started) continue;
        out.choices[i].started = true;
        if (r.endpoint == Endpoint::kChat)
          es.append_chunk(chat_delta_choice(i, {{"role", "assistant"}, {"content", ""}}, nullptr, ""));
        else if (r.echo && !r.logprobs)
          es.append_chunk(completion_choice(i, r.prompt_texts[i / r.params.n], nullptr, ""));
        else if (r.echo)  // with logprobs: the prompt goes out with its logprobs, once they are known
          out.choices[i].started = false;
      }
      if (!flush(es, sink)) return false;
      // From here the waker thread may write this stream's events, as long as this handler is
      // in its content provider (the sink's lifetime) and a write would not block.
      call->pump = [this, &call, &out, &r, &es, &sink, fd]() -> bool {
        if (es.gone || es.failed || fd < 0) return false;
        try {
          const Wrote w = write_updates(*call, out, r, es, sink, fd);
          if (w == Wrote::kGone) es.gone = true;
          if (w != Wrote::kOk) return false;
        } catch (...) {
          es.failed = std::current_exception();
          return false;
        }
        return !out.complete();
      };
    }
    struct Unhook {  // the waker must not touch `es` or `sink` once this function has returned
      Call& c;
      ~Unhook() {
        std::lock_guard<std::mutex> w(c.writer_mu);
        c.pump = nullptr;
      }
    } unhook{*call};
    while (true) {
      wait_for_updates(*call, std::chrono::milliseconds(100));
      std::lock_guard<std::mutex> w(call->writer_mu);
      if (es.failed) std::rethrow_exception(es.failed);
      if (es.gone) return false;
      if (!out.complete() && fd >= 0 && peer_closed(fd)) return false;
      // The updates the waker has not taken, and the events it left pending (if any).
      if (write_updates(*call, out, r, es, sink) != Wrote::kOk) return false;
      if (out.complete()) break;
      if (Clock::now() - es.idle_since > std::chrono::seconds(1)) {
        // An SSE comment: tells a client that went away (mid-prefill) from one still reading.
        static const std::string ping = ": ping\n\n";
        if (!sink.write(ping.data(), ping.size())) return false;
        es.idle_since = Clock::now();
      }
    }
    if (!out.error.empty()) {
      const ApiError e = refusal_error(out.error);
      json body = error_body(e);
      body["error"]["code"] = e.status;
      if (!send_event(sink, dump(body))) return false;
    } else if (r.include_usage) {
      json j = response_json(r.endpoint, id, created, opts.protocol.model_id, json::array(), true);
      j["usage"] = usage_json(out.usage());
      if (!send_event(sink, dump(j))) return false;
    }
    end_call(call, out, false);
    if (!send_event(sink, "[DONE]")) return false;
    sink.done();
    return true;
  }

  // ---- metrics ---------------------------------------------------------------------------------
  std::string metrics_text() {
    const EngineStats s = engine->stats();
    const std::string labels = "model_name=\"" + opts.protocol.model_id + "\"";
    std::ostringstream os;
    os.precision(17);  // counters stay exact integers (the default 6 digits printed 1.34026e+06)
    auto metric = [&](const std::string& name, const std::string& type, const std::string& help, double v) {
      os << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n"
         << name << "{" << labels << "} " << v << "\n";
    };
    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", s.num_running);
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", s.num_waiting);
    metric("vllm:num_requests_swapped", "gauge", "Number of requests swapped to CPU.", s.num_swapped);
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
           s.kv_blocks_total > 0 ? static_cast<double>(s.kv_blocks_used) / s.kv_blocks_total : 0.0);
    metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions from the engine.", s.num_preemptions);
    metric("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens.",
           s.prefix_queries_tokens);
    metric("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
           s.prefix_hits_tokens);
    // The engine's own step counters (as `bench generate` reports them): the engine's speed
    // inside the server, apart from HTTP and client timing.
    metric("andyllm:engine_steps_total", "counter", "Engine steps (batched forwards).", s.steps);
    metric("andyllm:engine_prefill_step_seconds_total", "counter",
           "Time in engine steps that computed prompt tokens.", s.prefill_step_seconds);
    metric("andyllm:engine_prefill_step_tokens_total", "counter",
           "Tokens (prompt and decode) of engine steps that computed prompt tokens.", s.prefill_step_tokens);
    metric("andyllm:engine_decode_step_seconds_total", "counter", "Time in decode-only engine steps.",
           s.decode_step_seconds);
    metric("andyllm:engine_decode_step_tokens_total", "counter", "Tokens of decode-only engine steps.",
           s.decode_step_tokens);
    std::lock_guard<std::mutex> lk(metrics_mu);
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", prompt_tokens_total);
    metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", generation_tokens_total);
    os << "# HELP vllm:request_success_total Count of finished requests (choices), by finish reason.\n"
       << "# TYPE vllm:request_success_total counter\n";
    for (const char* r : {"stop", "length", "abort"}) {
      auto it = finished_by_reason.find(r);
      os << "vllm:request_success_total{" << labels << ",finished_reason=\"" << r << "\"} "
         << (it == finished_by_reason.end() ? 0 : it->second) << "\n";
    }
    ttft.write(os, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", labels);
    itl.write(os, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", labels);
    e2e.write(os, "vllm:e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.", labels);
    queue.write(os, "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", labels);
    return os.str();
  }

  // ---- the engine thread -----------------------------------------------------------------------
  size_t live_count() {
    std::lock_guard<std::mutex> lk(live_mu);
    return live.size();
  }

  void cancel_all() {
    std::lock_guard<std::mutex> lk(live_mu);
    for (const auto& c : live) {
      std::lock_guard<std::mutex> lc(c->mu);
      for (int64_t id : c->ids) engine->cancel(id);
    }
  }

  void fail_all(const std::string& why) {
    std::lock_guard<std::mutex> lk(live_mu);
    for (const auto& c : live) {
      std::lock_guard<std::mutex> lc(c->mu);
      c->failure = why;
      c->cv.notify_all();
    }
  }

  void stop_listening() {
    svr.stop();
    if (listener.joinable()) listener.join();
  }
};

HttpServer::HttpServer(Engine* engine, TextCodec codec, HttpServerOptions opts)
    : impl_(std::make_unique<Impl>(engine, std::move(codec), std::move(opts))) {
  impl_->install_routes();
}

HttpServer::~HttpServer() {
  impl_->stop_listening();
}

int HttpServer::bind() {
  // A client that goes away must not kill the server with SIGPIPE.
  ::signal(SIGPIPE, SIG_IGN);
  return bind_server(impl_->svr, impl_->opts.host, impl_->opts.port);
}

void HttpServer::run(const std::function<bool()>& stop_requested) {
  Impl& s = *impl_;
  s.listener = start_listening(s.svr);
  s.serving = true;
  try {
    Clock::time_point deadline{};
    while (true) {
      if (!s.draining && stop_requested()) {
        s.draining = true;
        deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(s.opts.shutdown_timeout_s * 1000));
        log::info("serve: stop requested; draining ", s.live_count(), " request(s) (at most ", s.opts.shutdown_timeout_s, " s)");
      }
      if (s.draining) {
        if (s.live_count() == 0) break;
        if (Clock::now() >= deadline) {
          log::warn("serve: shutdown_timeout_s passed; cancelling ", s.live_count(), " request(s)");
          s.cancel_all();
          s.engine->run_until_idle();
          // Let the handlers write their last bytes.
          for (int i = 0; i < 40 && s.live_count() > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
          break;
        }
      }
      bool worked = false;
      {
        Waker::Step collecting(s.waker);  // the step's wake-ups delivered at its end, thrown or not
        worked = s.engine->step();
      }
      if (!worked) s.engine->wait_for_work(std::chrono::milliseconds(50));
    }
  } catch (const std::exception& e) {
    s.failed = true;
    s.fail_all(std::string("the engine failed: ") + e.what());
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    s.stop_listening();
    throw;
  }
  s.serving = false;
  s.stop_listening();
  s.engine->shutdown_workers(0);
  log::info("serve: stopped");
}

struct LoadingServer::Impl {
  httplib::Server svr;
  std::thread listener;
};

LoadingServer::LoadingServer(const std::string& host, int port) : impl_(std::make_unique<Impl>()) {
  ::signal(SIGPIPE, SIG_IGN);
  auto loading = [](const httplib::Request&, httplib::Response& res) {
    send_error(res, error_of(503, "service_unavailable", "the model is loading"));
  };
  impl_->svr.Get(".*", loading);
  impl_->svr.Post(".*", loading);
  impl_->svr.set_keep_alive_max_count(1);
  exclusive_port(impl_->svr);
  port_ = bind_server(impl_->svr, host, port);
  if (port_ > 0) impl_->listener = start_listening(impl_->svr);
}

LoadingServer::~LoadingServer() { close(); }

void LoadingServer::close() {
  impl_->svr.stop();
  if (impl_->listener.joinable()) impl_->listener.join();
}

}  // namespace andy::serve
