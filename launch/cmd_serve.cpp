// `andyllm serve`: the OpenAI-compatible HTTP server (serve/http_server.h) on the inference
// engine, tensor parallel over the ranks of mpirun. Rank 0 serves HTTP and runs the engine loop;
// the other ranks follow its step plans. SIGTERM / SIGINT / SIGUSR1 (scripts/mpirun.sh forwards
// Ctrl-C as SIGUSR1) drain the server, then every rank exits 0; a second signal to rank 0 while
// it drains ends it at once (and so the job, non-zero).
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "core/base/logging.h"
#include "launch/commands.h"
#include "launch/serving.h"
#include "launch/trainer.h"
#include "parallel/mpi_utils.h"
#include "serve/http_server.h"

namespace andy {

namespace fs = std::filesystem;

namespace {

// Flags only `serve` has, each a [serve] key (vLLM's names).
const std::vector<std::pair<std::string, std::string>>& serve_only_keys() {
  static const std::vector<std::pair<std::string, std::string>> keys = {
      {"host", "host"},
      {"port", "port"},
      {"served_model_name", "served_model_name"},
      {"api_key", "api_key"},
      {"chat_template", "chat_template"},
      {"max_waiting", "max_waiting"},
      {"shutdown_timeout_s", "shutdown_timeout_s"},
      {"max_request_bytes", "max_request_bytes"},
      {"enable_prefix_caching", "enable_prefix_caching"},
      {"seed", "seed"},
  };
  return keys;
}

std::vector<Flag> serve_flags() {
  std::vector<Flag> flags = {
      {"config", "FILE", "TOML config with a [serve] section (see configs/)"},
      {"set", "SECTION.KEY=VALUE", "override one config key, e.g. --set serve.max_waiting=64", true},
      {"print_config", "", "print the effective config and exit"},
      {"help_config", "", "print every config key with type, default, range and description"},
  };
  for (auto& f : serving_flags()) flags.push_back(f);
  flags.push_back({"host", "ADDR", "address to bind (serve.host; default 127.0.0.1: this machine only)"});
  flags.push_back({"port", "N", "HTTP port; 0 picks a free one and prints it (serve.port)"});
  flags.push_back({"served_model_name", "NAME", "model id in the API (serve.served_model_name)"});
  flags.push_back({"api_key", "KEY", "bearer key required by /v1/* (serve.api_key)"});
  flags.push_back({"chat_template", "andyllm|plain", "prompt format of /v1/chat/completions (serve.chat_template)"});
  flags.push_back({"max_waiting", "N", "requests waiting for the engine at most; more get 429 (serve.max_waiting)"});
  flags.push_back({"shutdown_timeout_s", "S", "drain time for running requests on SIGTERM (serve.shutdown_timeout_s)"});
  flags.push_back({"max_request_bytes", "N", "largest request body; larger get 413 (serve.max_request_bytes)"});
  flags.push_back({"enable_prefix_caching", "true|false", "reuse KV blocks of shared prompt prefixes"});
  flags.push_back({"seed", "N", "seed of requests that give none (serve.seed)"});
  flags.push_back({"tensor_parallel_size", "N", "checked against the rank count (mpirun -np N)"});
  return flags;
}

ParsedArgs with_serve_flags(const ParsedArgs& args) { return with_serving_flags(args, serve_only_keys()); }

// The model id: serve.served_model_name, else the model directory's name (the directory of a
// model.pt file); for a run's best_model/ or checkpoints/step_N/, the run's name
// (outputs/tiny/best_model -> "tiny").
std::string model_id_of(const Config& cfg) {
  if (!cfg.serve.served_model_name.empty()) return cfg.serve.served_model_name;
  fs::path p = fs::path(cfg.serve.model).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  if (p.has_extension()) p = p.parent_path();
  const std::string name = p.filename().string();
  if (name == "best_model") p = p.parent_path();
  if (name.rfind("step_", 0) == 0 && p.parent_path().filename() == "checkpoints") p = p.parent_path().parent_path();
  return p.filename().empty() ? "andyllm" : p.filename().string();
}

// A sentencepiece piece as API text: "▁" is a space, a byte piece <0xNN> that byte.
std::string token_text(const data::Tokenizer& tok, int32_t id) {
  std::string piece = tok.id_to_piece(id);
  if (piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece.back() == '>')
    return std::string(1, static_cast<char>(std::stoi(piece.substr(3, 2), nullptr, 16)));
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, 3, "\xE2\x96\x81") == 0) {
      out += ' ';
      i += 3;
    } else {
      out += piece[i++];
    }
  }
  return out;
}

serve::TextCodec codec_of(const data::Tokenizer* tok) {
  serve::TextCodec c;
  c.encode = [tok](const std::string& s) { return tok->encode(s); };
  c.decode = [tok](const std::vector<int32_t>& ids) { return tok->decode(ids); };
  c.token_text = [tok](int32_t id) { return token_text(*tok, id); };
  c.vocab_size = tok->vocab_size();
  return c;
}

int run_serve(const ParsedArgs& raw, World* world) {
  ParsedArgs args = with_serve_flags(raw);
  Config cfg = load_config_collectively(args, world);
  if (handle_config_info_flags(args, cfg)) return 0;
  configure_threads(cfg, world);
  run_agreed(world->comm().get(), [&] {
    if (!args.has("tensor_parallel_size")) return;
    const int64_t tp = args.get_int("tensor_parallel_size", 0);
    ANDY_USER_CHECK(tp == world->size(), "--tensor_parallel_size ", tp, " but the job has ", world->size(),
                    " rank(s): start it with mpirun -np ", tp);
  });
  // Before the (long) load, so an early SIGTERM drains instead of killing a rank.
  install_stop_signal_handlers(/*second_signal_exits=*/true);
  // Rank 0 listens from the start: 503 on every route while the model loads. A port that
  // cannot be bound stops every rank with one message.
  std::unique_ptr<serve::LoadingServer> loading;
  int port = static_cast<int>(cfg.serve.port);
  run_agreed(world->comm().get(), [&] {
    if (!world->is_root()) return;
    loading = std::make_unique<serve::LoadingServer>(cfg.serve.host, port);
    ANDY_USER_CHECK(loading->port() > 0, "andyllm serve: cannot listen on ", cfg.serve.host, ":", port,
                    " (in use? --port 0 picks a free port)");
    port = loading->port();
    log::info("loading the model; http://", cfg.serve.host, ":", port, "/health answers 503 until it is ready");
  });
  ServingStack st = build_serving_stack(cfg, world);
  if (!world->is_root()) return st.engine->run_worker();
  loading->close();

  serve::HttpServerOptions o;
  o.host = cfg.serve.host;
  o.port = port;
  o.api_key = cfg.serve.api_key;
  o.max_request_bytes = cfg.serve.max_request_bytes;
  o.shutdown_timeout_s = cfg.serve.shutdown_timeout_s;
  o.unhealthy = [] { return stop_signal_received(); };  // before the engine loop notices it
  o.http_threads = static_cast<int>(std::max<int64_t>(16, 2 * cfg.serve.max_num_seqs + 8));
  o.protocol.model_id = model_id_of(cfg);
  o.protocol.max_model_len = st.engine->options().max_model_len;
  o.protocol.max_tokens_default = cfg.serve.max_tokens_default;
  o.protocol.chat_template = cfg.serve.chat_template;
  serve::HttpServer server(st.engine.get(), codec_of(&*st.tokenizer), o);
  if (server.bind() < 0) {  // taken in the moment between the loading server and this one
    log::error("andyllm serve: cannot listen on ", o.host, ":", o.port, " (in use? try --port 0 for a free port)");
    st.engine->shutdown_workers(2);
    return 2;
  }
  const std::string url = "http://" + o.host + ":" + std::to_string(port);
  std::printf("andyllm serve: model %s ready at %s (port %d)\n  curl %s/v1/completions -H 'Content-Type: application/json'%s"
              " -d '{\"model\": \"%s\", \"prompt\": \"Once upon a time\", \"max_tokens\": 32}'\n",
              o.protocol.model_id.c_str(), url.c_str(), port, url.c_str(),
              o.api_key.empty() ? "" : " -H 'Authorization: Bearer $API_KEY'", o.protocol.model_id.c_str());
  std::fflush(stdout);
  server.run([] { return stop_signal_received(); });  // a second signal ends the process (the handler)
  return 0;
}

}  // namespace

Subcommand make_serve_command() {
  Subcommand c;
  c.name = "serve";
  c.summary = "OpenAI-compatible HTTP server, tensor-parallel over the ranks";
  c.usage =
      "usage: mpirun -np TP andyllm serve --model outputs/tiny/best_model [--port 8000]\n"
      "       andyllm serve --model DIR/model.pt --tokenizer_path tokenizer.model --port 0\n"
      "  routes: POST /v1/completions, /v1/chat/completions, /tokenize, /detokenize;\n"
      "          GET /v1/models, /health, /metrics";
  c.flags = serve_flags();
  c.needs_mpi = true;
  c.run = run_serve;
  return c;
}

}  // namespace andy
