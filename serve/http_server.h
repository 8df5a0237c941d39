// The OpenAI-compatible HTTP front end of the engine (rank 0): routes /v1/completions,
// /v1/chat/completions (JSON or Server-Sent Events), /v1/models, /health, /metrics (Prometheus
// text, vLLM's metric names), /tokenize and /detokenize.
//
// Threads (llama.cpp server's shape): HTTP handler threads parse a request (openai_protocol.h),
// submit() it to the engine and wait on the call's own queue; they never run the model and
// never throw (every failure is an OpenAI error object). The engine thread is the one that calls
// run(): it steps the engine, whose callbacks only copy updates into those queues.
//
// run():
//   1. listen (on a thread of its own; handlers on httplib's pool);
//   2. loop: step the engine, or wait up to 50 ms for work;
//   3. once stop_requested() is true: drain — /health and new requests answer 503, running
//      requests finish within shutdown_timeout_s, then whatever is left is cancelled;
//   4. stop listening, tell the worker ranks to exit (shutdown_workers(0)).
// A client that disconnects from a stream has its requests cancelled (their KV blocks freed).
//
//   HttpServer server(engine, codec, opts);
//   int port = server.bind();        // before run(); opts.port = 0 picks a free port
//   server.run([] { return stop_signal_received(); });
#pragma once

#include <atomic>
#include <functional>
#include <memory>
#include <string>

#include "serve/engine.h"
#include "serve/openai_protocol.h"

namespace andy::serve {

struct HttpServerOptions {
  std::string host = "127.0.0.1";     // Default: this machine only
  int port = 8000;                    // 0: any free port (bind() returns it)
  std::string api_key;                // bearer key for /v1/*; "": none
  int64_t max_request_bytes = 8 << 20;  // larger bodies: 413
  double shutdown_timeout_s = 30;     // drain time for running requests after the stop request
  int http_threads = 64;              // concurrent connections served at most
  // Optional: true once something outside the server means it should not be sent traffic
  // (a stop signal arrived, while the engine thread may still be inside a step): /health 503.
  std::function<bool()> unhealthy;
  ProtocolOptions protocol;
};

class HttpServer {
 public:
  // `engine` must outlive the server; the codec's functions are called from many threads.
  HttpServer(Engine* engine, TextCodec codec, HttpServerOptions opts);
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds the listening socket; returns the port, or -1 when it cannot be bound.
  int bind();
  // The engine thread's loop (see the file comment); returns after the drain and after telling
  // the workers to exit. An engine failure fails every open request, stops listening and is
  // rethrown (the caller ends the job).
  void run(const std::function<bool()>& stop_requested);

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

// What answers while the model loads (before an HttpServer exists): 503 with an OpenAI error
// object on every route, /health included. Rank 0 starts it first, so a load balancer or a
// client polling /health sees "not ready" rather than a refused connection; close() frees the
// port for the HttpServer (bind it to port() once this is closed).
class LoadingServer {
 public:
  LoadingServer(const std::string& host, int port);  // port 0: any free port
  ~LoadingServer();
  LoadingServer(const LoadingServer&) = delete;
  LoadingServer& operator=(const LoadingServer&) = delete;
  int port() const { return port_; }  // -1 when it could not bind
  void close();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  int port_ = -1;
};

}  // namespace andy::serve
