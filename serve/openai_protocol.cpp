// OpenAI / vLLM request parsing and response shapes (see openai_protocol.h).
#include "serve/openai_protocol.h"

#include <algorithm>
#include <cmath>

namespace andy::serve {

namespace {

constexpr int64_t kMaxTopLogprobs = 20;
const std::string kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

std::string type_name(const json& v) {
  if (v.is_string()) return "a string";
  if (v.is_boolean()) return "a boolean";
  if (v.is_number()) return "a number";
  if (v.is_array()) return "an array";
  if (v.is_object()) return "an object";
  return "null";
}

// Reads an optional field; null counts as absent. Each returns an error naming the field when
// the value has the wrong type.
struct Fields {
  const json& body;
  std::optional<ApiError> err;

  const json* get(const char* key) {
    auto it = body.find(key);
    if (it == body.end() || it->is_null()) return nullptr;
    return &*it;
  }
  void wrong(const char* key, const json& v, const std::string& expected) {
    if (!err) err = bad_param(key, std::string(key) + ": expected " + expected + ", got " + type_name(v));
  }
  void number(const char* key, double* out) {
    if (const json* v = get(key)) {
      if (v->is_number()) *out = v->get<double>();
      else wrong(key, *v, "a number");
    }
  }
  void integer(const char* key, int64_t* out) {
    if (const json* v = get(key)) {
      if (v->is_number_integer()) *out = v->get<int64_t>();
      else if (v->is_number_float() && std::floor(v->get<double>()) == v->get<double>()) *out = static_cast<int64_t>(v->get<double>());
      else wrong(key, *v, "an integer");
    }
  }
  void boolean(const char* key, bool* out) {
    if (const json* v = get(key)) {
      if (v->is_boolean()) *out = v->get<bool>();
      else wrong(key, *v, "a boolean");
    }
  }
};

// The leading field name of a SamplingParams::validate() message ("logit_bias[5] = ..." ->
// "logit_bias").
std::string param_of(const std::string& message) {
  size_t n = 0;
  while (n < message.size() && (std::islower(static_cast<unsigned char>(message[n])) || message[n] == '_')) ++n;
  return message.substr(0, n);
}

bool all_integers(const json& a) {
  return std::all_of(a.begin(), a.end(), [](const json& x) { return x.is_number_integer(); });
}

// The prompts of a completions request: a string, strings, token ids or lists of token ids.
std::optional<ApiError> parse_prompt(const json& body, const TextCodec& codec, ApiRequest* out) {
  auto it = body.find("prompt");
  if (it == body.end() || it->is_null()) return bad_param("prompt", "prompt: required");
  const json& p = *it;
  auto add_ids = [&](const json& ids) -> std::optional<ApiError> {
    std::vector<int32_t> v;
    for (const json& x : ids) {
      const int64_t id = x.get<int64_t>();
      if (id < 0 || id >= codec.vocab_size)
        return bad_param("prompt", "prompt: token id " + std::to_string(id) + " is outside the vocabulary 0.." +
                                       std::to_string(codec.vocab_size - 1));
      v.push_back(static_cast<int32_t>(id));
    }
    out->prompt_texts.push_back(codec.decode(v));
    out->prompts.push_back(std::move(v));
    return std::nullopt;
  };
  auto add_text = [&](const std::string& s) {
    out->prompt_texts.push_back(s);
    out->prompts.push_back(codec.encode(s));
  };
  const std::string expected = "a string, a list of strings, a list of token ids or a list of lists of token ids";
  if (p.is_string()) {
    add_text(p.get<std::string>());
  } else if (p.is_array() && !p.empty() && p[0].is_string()) {
    for (const json& s : p) {
      if (!s.is_string()) return bad_param("prompt", "prompt: expected " + expected);
      add_text(s.get<std::string>());
    }
  } else if (p.is_array() && !p.empty() && all_integers(p)) {
    if (auto e = add_ids(p)) return e;
  } else if (p.is_array() && !p.empty() && p[0].is_array()) {
    for (const json& ids : p) {
      if (!ids.is_array() || !all_integers(ids)) return bad_param("prompt", "prompt: expected " + expected);
      if (auto e = add_ids(ids)) return e;
    }
  } else {
    return bad_param("prompt", "prompt: expected " + expected + (p.is_array() && p.empty() ? " (got an empty list)" : ""));
  }
  return std::nullopt;
}

// "model": absent, or the served model's id (404 otherwise, as OpenAI and vLLM).
std::optional<ApiError> check_model(Fields& f, const ProtocolOptions& opts) {
  const json* m = f.get("model");
  if (!m) return std::nullopt;
  if (!m->is_string()) return bad_param("model", "model: expected a string, got " + type_name(*m));
  if (m->get<std::string>() == opts.model_id) return std::nullopt;
  ApiError e = bad_param("model", "The model `" + m->get<std::string>() + "` does not exist. This server serves `" +
                                      opts.model_id + "` (GET /v1/models).");
  e.status = 404;
  e.code = "model_not_found";
  return e;
}

// The plain sampling fields (numbers and switches) and user / seed / logit_bias.
std::optional<ApiError> parse_sampling(Fields& f, ApiRequest* out) {
  SamplingParams& p = out->params;
  f.number("temperature", &p.temperature);
  f.number("top_p", &p.top_p);
  f.integer("top_k", &p.top_k);
  f.number("min_p", &p.min_p);
  f.integer("seed", &p.seed);
  f.number("presence_penalty", &p.presence_penalty);
  f.number("frequency_penalty", &p.frequency_penalty);
  f.number("repetition_penalty", &p.repetition_penalty);
  f.integer("n", &p.n);
  f.boolean("ignore_eos", &p.ignore_eos);
  f.boolean("include_stop_str_in_output", &out->include_stop_str_in_output);
  f.boolean("stream", &out->stream);
  if (f.err) return f.err;
  if (const json* u = f.get("user"); u && !u->is_string()) return bad_param("user", "user: expected a string");
  if (const json* s = f.get("seed"); s && p.seed < 0)
    return bad_param("seed", "seed = " + std::to_string(p.seed) + ": expected seed >= 0");
  if (const json* lb = f.get("logit_bias")) {
    if (!lb->is_object()) return bad_param("logit_bias", "logit_bias: expected an object {\"token id\": bias}");
    for (auto it = lb->begin(); it != lb->end(); ++it) {
      char* end = nullptr;
      const long id = std::strtol(it.key().c_str(), &end, 10);
      if (it.key().empty() || *end || !it.value().is_number())
        return bad_param("logit_bias", "logit_bias: expected token ids as keys and numbers as values, got \"" + it.key() + "\"");
      p.logit_bias[static_cast<int32_t>(id)] = it.value().get<double>();
    }
  }
  return std::nullopt;
}

// stop, stop_token_ids, stream_options and the logprobs count.
std::optional<ApiError> parse_stops_and_stream(Fields& f, ApiRequest* out) {
  if (const json* st = f.get("stop")) {
    if (st->is_string()) {
      out->stop.push_back(st->get<std::string>());
    } else if (st->is_array()) {
      for (const json& s : *st) {
        if (!s.is_string()) return bad_param("stop", "stop: expected a string or a list of strings");
        out->stop.push_back(s.get<std::string>());
      }
    } else {
      return bad_param("stop", "stop: expected a string or a list of strings, got " + type_name(*st));
    }
    for (const std::string& s : out->stop)
      if (s.empty()) return bad_param("stop", "stop: a stop string must not be empty");
  }
  if (const json* ids = f.get("stop_token_ids")) {
    if (!ids->is_array() || !all_integers(*ids)) return bad_param("stop_token_ids", "stop_token_ids: expected a list of token ids");
    for (const json& x : *ids) out->params.stop_token_ids.push_back(static_cast<int32_t>(x.get<int64_t>()));
  }
  if (const json* so = f.get("stream_options")) {
    if (!out->stream) return bad_param("stream_options", "stream_options: only allowed when stream is true");
    if (!so->is_object()) return bad_param("stream_options", "stream_options: expected an object");
    Fields sf{*so, std::nullopt};
    sf.boolean("include_usage", &out->include_usage);
    if (sf.err) return bad_param("stream_options", "stream_options.include_usage: expected a boolean");
  }
  const bool chat = out->endpoint == Endpoint::kChat;
  if (out->top_logprobs < 0 || out->top_logprobs > kMaxTopLogprobs)
    return bad_param(chat ? "top_logprobs" : "logprobs", (chat ? "top_logprobs = " : "logprobs = ") +
                                                             std::to_string(out->top_logprobs) + ": expected 0 <= value <= 20");
  out->params.logprobs = out->logprobs ? out->top_logprobs : -1;
  return std::nullopt;
}

// max_tokens: as given, else the default capped by the room left in the context; then the
// whole request must fit the context (vLLM's wording, as the engine's).
std::optional<ApiError> settle_max_tokens(const ProtocolOptions& opts, const TextCodec& codec, int64_t max_tokens,
                                          ApiRequest* out) {
  SamplingParams& p = out->params;
  const char* prompt_param = out->endpoint == Endpoint::kChat ? "messages" : "prompt";
  int64_t longest = 0;
  for (const auto& prompt : out->prompts) {
    if (prompt.empty()) return bad_param(prompt_param, "the prompt is empty (at least one token is needed)");
    longest = std::max(longest, static_cast<int64_t>(prompt.size()));
  }
  if (max_tokens >= 0) {
    p.max_tokens = max_tokens;
  } else {
    if (longest >= opts.max_model_len)
      return bad_param(prompt_param, "This model's maximum context length is " + std::to_string(opts.max_model_len) +
                                         " tokens. However, your request has " + std::to_string(longest) +
                                         " input tokens. Please reduce the length of the input messages.");
    p.max_tokens = std::min(opts.max_tokens_default, opts.max_model_len - longest);
  }
  const std::string bad = p.validate(codec.vocab_size);
  if (!bad.empty()) return bad_param(param_of(bad), bad);
  if (longest + p.max_tokens > opts.max_model_len)
    return bad_param(prompt_param, "This model's maximum context length is " + std::to_string(opts.max_model_len) +
                                       " tokens. However, you requested " + std::to_string(longest + p.max_tokens) +
                                       " tokens (" + std::to_string(longest) + " in the messages, " +
                                       std::to_string(p.max_tokens) +
                                       " in the completion). Please reduce the length of the messages or completion.");
  return std::nullopt;
}

// Fields both endpoints share; `max_tokens` already read (or -1).
std::optional<ApiError> parse_common(const json& body, const ProtocolOptions& opts, const TextCodec& codec,
                                     int64_t max_tokens, ApiRequest* out) {
  Fields f{body, std::nullopt};
  if (auto e = check_model(f, opts)) return e;
  if (auto e = parse_sampling(f, out)) return e;
  if (auto e = parse_stops_and_stream(f, out)) return e;
  return settle_max_tokens(opts, codec, max_tokens, out);
}

}  // namespace

json error_body(const ApiError& e) {
  return {{"error",
           {{"message", e.message},
            {"type", e.type},
            {"param", e.param.empty() ? json(nullptr) : json(e.param)},
            {"code", e.code.empty() ? json(nullptr) : json(e.code)}}}};
}

ApiError bad_param(const std::string& param, const std::string& message) {
  ApiError e;
  e.message = message;
  e.param = param;
  return e;
}

std::optional<ApiError> parse_completion_request(const json& body, const ProtocolOptions& opts,
                                                 const TextCodec& codec, ApiRequest* out) {
  *out = ApiRequest{};
  out->endpoint = Endpoint::kCompletions;
  if (!body.is_object()) return bad_param("", "the request body must be a JSON object");
  Fields f{body, std::nullopt};
  if (const json* s = f.get("suffix"); s && !(s->is_string() && s->get<std::string>().empty()))
    return bad_param("suffix", "suffix: not supported (insertion needs a fill-in-the-middle model)");
  int64_t max_tokens = -1, logprobs = -1;
  f.integer("max_tokens", &max_tokens);
  f.integer("logprobs", &logprobs);
  f.boolean("echo", &out->echo);
  if (f.err) return f.err;
  if (f.get("logprobs")) {
    out->logprobs = true;
    out->top_logprobs = logprobs;
  }
  if (max_tokens == 0) {  // lm-evaluation-harness's loglikelihood requests: echo, logprobs, max_tokens 0
    if (!out->echo) return bad_param("max_tokens", "max_tokens = 0: expected max_tokens >= 1 (0 only with echo)");
    out->prompt_only = true;
    max_tokens = 1;
  }
  if (auto e = parse_prompt(body, codec, out)) return e;
  if (auto e = parse_common(body, opts, codec, max_tokens, out)) return e;
  if (out->echo && out->logprobs) out->params.prompt_logprobs = out->top_logprobs;
  return std::nullopt;
}

std::optional<ApiError> apply_chat_template(const json& messages, const std::string& template_name,
                                            std::string* prompt) {
  if (!messages.is_array() || messages.empty())
    return bad_param("messages", "messages: expected a non-empty list of {\"role\", \"content\"}");
  std::string out;
  for (size_t i = 0; i < messages.size(); ++i) {
    const json& m = messages[i];
    const std::string where = "messages[" + std::to_string(i) + "]";
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string())
      return bad_param("messages", where + ": expected an object with a \"role\" string");
    const std::string role = m["role"].get<std::string>();
    if (role != "system" && role != "user" && role != "assistant" && role != "developer")
      return bad_param("messages", where + ".role = \"" + role + "\": expected system, developer, user or assistant");
    std::string content;
    const json c = m.value("content", json(nullptr));
    if (c.is_string()) {
      content = c.get<std::string>();
    } else if (c.is_array()) {  // [{"type": "text", "text": "..."}]
      for (const json& part : c) {
        if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") || !part["text"].is_string())
          return bad_param("messages", where + ".content: only text parts are supported");
        content += part["text"].get<std::string>();
      }
    } else if (!(c.is_null() && role == "assistant")) {
      return bad_param("messages", where + ".content: expected a string or a list of text parts");
    }
    if (template_name == "plain") {
      out += (i ? "\n" : "") + content;
    } else {
      out += "<|" + std::string(role == "developer" ? "system" : role) + "|>\n" + content + "\n";
    }
  }
  if (template_name != "plain") out += "<|assistant|>\n";
  *prompt = out;
  return std::nullopt;
}

std::optional<ApiError> parse_chat_request(const json& body, const ProtocolOptions& opts, const TextCodec& codec,
                                           ApiRequest* out) {
  *out = ApiRequest{};
  out->endpoint = Endpoint::kChat;
  if (!body.is_object()) return bad_param("", "the request body must be a JSON object");
  Fields f{body, std::nullopt};
  if (f.get("chat_template"))
    return bad_param("chat_template", "chat_template: per-request chat templates are not enabled on this server (it uses [serve] chat_template = \"" +
                                          opts.chat_template + "\")");
  int64_t max_tokens = -1, max_completion_tokens = -1;
  f.integer("max_tokens", &max_tokens);
  f.integer("max_completion_tokens", &max_completion_tokens);
  f.boolean("logprobs", &out->logprobs);
  f.integer("top_logprobs", &out->top_logprobs);
  if (f.err) return f.err;
  if (f.get("top_logprobs") && !out->logprobs) return bad_param("top_logprobs", "top_logprobs: requires logprobs: true");
  if (max_completion_tokens >= 0) max_tokens = max_completion_tokens;
  if (!body.contains("messages")) return bad_param("messages", "messages: required");
  std::string prompt;
  if (auto e = apply_chat_template(body["messages"], opts.chat_template, &prompt)) return e;
  out->prompt_texts.push_back(prompt);
  out->prompts.push_back(codec.encode(prompt));
  return parse_common(body, opts, codec, max_tokens, out);
}

// ---- text assembly ---------------------------------------------------------------------------

size_t incomplete_utf8_tail(const std::string& s) {
  size_t tail = 0;
  // Trailing U+FFFD: a decoder's stand-in for bytes of a character still to come.
  while (s.size() - tail >= 3 && s.compare(s.size() - tail - 3, 3, kReplacementChar) == 0) tail += 3;
  if (tail > 0) return tail;
  // A lead byte whose continuation bytes are not all there yet.
  for (size_t back = 1; back <= std::min<size_t>(3, s.size()); ++back) {
    const unsigned char c = static_cast<unsigned char>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: look further back
    size_t need = (c & 0xE0) == 0xC0 ? 2 : (c & 0xF0) == 0xE0 ? 3 : (c & 0xF8) == 0xF0 ? 4 : 1;
    return need > back ? back : 0;
  }
  return 0;
}

TextAssembler::TextAssembler(const TextCodec* codec, std::vector<std::string> stop, bool include_stop)
    : codec_(codec), stop_(std::move(stop)), include_stop_(include_stop) {}

std::string TextAssembler::decoded_text() {
  const auto from = tokens_.begin() + static_cast<std::ptrdiff_t>(prefix_offset_);
  const std::string prefix = codec_->decode(std::vector<int32_t>(from, tokens_.begin() + static_cast<std::ptrdiff_t>(read_offset_)));
  const std::string window = codec_->decode(std::vector<int32_t>(from, tokens_.end()));
  if (window.size() <= prefix.size() || window.compare(0, prefix.size(), prefix) != 0) return committed_;
  std::string added = window.substr(prefix.size());
  if (incomplete_utf8_tail(added) > 0) return committed_ + added;  // not committed: may still change
  committed_ += added;
  prefix_offset_ = read_offset_;
  read_offset_ = tokens_.size();
  return committed_;
}

std::string TextAssembler::append(const std::vector<int32_t>& tokens) {
  std::string released;
  for (int32_t t : tokens) {
    if (stopped_) break;
    tokens_.push_back(t);
    const std::string text = decoded_text();
    // 1. A complete stop string ends the text.
    size_t stop_at = std::string::npos, stop_len = 0;
    for (const std::string& s : stop_) {
      const size_t pos = text.find(s);
      if (pos != std::string::npos && pos < stop_at) {
        stop_at = pos;
        stop_len = s.size();
      }
    }
    size_t end;
    if (stop_at != std::string::npos) {
      stopped_ = true;
      end = stop_at + (include_stop_ ? stop_len : 0);
    } else {
      // 2. Hold back an incomplete character and the longest tail that starts a stop string.
      end = text.size() - incomplete_utf8_tail(text);
      size_t hold = 0;
      for (const std::string& s : stop_)
        for (size_t k = std::min(s.size() - 1, end); k > hold; --k)
          if (text.compare(end - k, k, s, 0, k) == 0) {
            hold = k;
            break;
          }
      end -= hold;
    }
    if (end > emitted_.size()) {
      std::string delta = text.substr(emitted_.size(), end - emitted_.size());
      emitted_ += delta;
      released += delta;
    }
  }
  return released;
}

std::string TextAssembler::finish() {
  if (stopped_) return "";
  const std::string text = codec_->decode(tokens_);
  if (text.size() <= emitted_.size()) return "";
  std::string rest = text.substr(emitted_.size());
  emitted_ += rest;
  return rest;
}

// ---- responses -------------------------------------------------------------------------------

json usage_json(const Usage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens}};
}

namespace {
// Completions' top_logprobs entry of one token: {token text: logprob} of its alternatives.
json completion_top_json(const SampledToken& t, const TextCodec& codec) {
  json top = json::object();
  for (const auto& [id, lp] : t.top) top[codec.token_text(id)] = lp;
  return top;
}
}  // namespace

json completion_logprobs_json(const std::vector<SampledToken>& sampled, const TextCodec& codec, int64_t offset0) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  int64_t offset = offset0;
  for (const SampledToken& t : sampled) {
    const std::string text = codec.token_text(t.token);
    tokens.push_back(text);
    lps.push_back(t.logprob);
    tops.push_back(completion_top_json(t, codec));
    offsets.push_back(offset);
    offset += static_cast<int64_t>(text.size());
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

json echo_logprobs_json(const std::vector<int32_t>& prompt, const std::vector<SampledToken>& prompt_scored,
                        const std::vector<SampledToken>& generated, const TextCodec& codec, int64_t generated_offset) {
  json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
  int64_t offset = 0;
  for (size_t i = 0; i < prompt.size(); ++i) {
    const std::string text = codec.token_text(prompt[i]);
    tokens.push_back(text);
    offsets.push_back(offset);
    offset += static_cast<int64_t>(text.size());
    if (i == 0 || i > prompt_scored.size()) {  // nothing predicts the first token
      lps.push_back(nullptr);
      tops.push_back(nullptr);
      continue;
    }
    lps.push_back(prompt_scored[i - 1].logprob);
    tops.push_back(completion_top_json(prompt_scored[i - 1], codec));
  }
  const json g = completion_logprobs_json(generated, codec, generated_offset);
  for (const json& v : g["tokens"]) tokens.push_back(v);
  for (const json& v : g["token_logprobs"]) lps.push_back(v);
  for (const json& v : g["top_logprobs"]) tops.push_back(v);
  for (const json& v : g["text_offset"]) offsets.push_back(v);
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
}

namespace {
json bytes_of(const std::string& s) {
  json b = json::array();
  for (unsigned char c : s) b.push_back(static_cast<int>(c));
  return b;
}
}  // namespace

json chat_logprobs_json(const std::vector<SampledToken>& sampled, const TextCodec& codec) {
  json content = json::array();
  for (const SampledToken& t : sampled) {
    const std::string text = codec.token_text(t.token);
    json top = json::array();
    for (const auto& [id, lp] : t.top) {
      const std::string alt = codec.token_text(id);
      top.push_back({{"token", alt}, {"logprob", lp}, {"bytes", bytes_of(alt)}});
    }
    content.push_back({{"token", text}, {"logprob", t.logprob}, {"bytes", bytes_of(text)}, {"top_logprobs", top}});
  }
  return {{"content", content}};
}

std::string response_id(Endpoint e, int64_t serial) {
  return (e == Endpoint::kChat ? "chatcmpl-" : "cmpl-") + std::to_string(serial);
}

namespace {
json reason(const std::string& r) { return r.empty() ? json(nullptr) : json(r); }
}  // namespace

json completion_choice(int64_t index, const std::string& text, const json& logprobs, const std::string& finish_reason) {
  return {{"index", index}, {"text", text}, {"logprobs", logprobs}, {"finish_reason", reason(finish_reason)}};
}

json chat_choice(int64_t index, const std::string& content, const json& logprobs, const std::string& finish_reason) {
  return {{"index", index},
          {"message", {{"role", "assistant"}, {"content", content}}},
          {"logprobs", logprobs},
          {"finish_reason", reason(finish_reason)}};
}

json chat_delta_choice(int64_t index, const json& delta, const json& logprobs, const std::string& finish_reason) {
  return {{"index", index}, {"delta", delta}, {"logprobs", logprobs}, {"finish_reason", reason(finish_reason)}};
}

json response_json(Endpoint e, const std::string& id, int64_t created, const std::string& model, json choices,
                   bool chunk) {
  std::string object = e == Endpoint::kChat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
  return {{"id", id}, {"object", object}, {"created", created}, {"model", model}, {"choices", std::move(choices)}};
}

}  // namespace andy::serve
