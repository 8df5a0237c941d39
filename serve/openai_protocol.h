// The OpenAI / vLLM HTTP protocol, without HTTP: request bodies parsed and validated into engine
// requests, engine output turned into response and stream-chunk JSON, errors as OpenAI error
// objects. Pure functions and small value types, so every rule is unit-tested without a model
// or a socket (tests/serve/test_openai_protocol.cpp); serve/http_server.h puts them on routes.
//
// Convention: a parse function never throws for a bad request; it returns an ApiError naming
// the offending field in `param` (status 400 unless said otherwise).
//
// Chat templates ([serve] chat_template):
//   "andyllm" (default, for models trained here): every message as "<|ROLE|>\nCONTENT\n", then
//             "<|assistant|>\n" for the reply, e.g.
//               <|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n
//   "plain":  the message contents joined by "\n" (a base model just continues the text).
//
//   ApiRequest r;
//   if (auto err = parse_completion_request(body, opts, codec, &r)) return error_body(*err);
//   TextAssembler text(&codec, r.stop, r.include_stop_str_in_output);
//   std::string delta = text.append(update.new_tokens);
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>
#include <nlohmann/json.hpp>

#include "serve/sampler.h"

namespace andy::serve {

using json = nlohmann::json;

// An OpenAI error: HTTP status and the body's fields.
struct ApiError {
  int status = 400;
  std::string message;
  std::string type = "invalid_request_error";  // or "authentication_error", "not_found_error", ...
  std::string param;                            // the request field at fault; "" when none
  std::string code;                             // "" when none
};
// {"error": {"message", "type", "param", "code"}} (param / code null when empty).
json error_body(const ApiError& e);
ApiError bad_param(const std::string& param, const std::string& message);

// What the protocol needs of a tokenizer (data::Tokenizer in the server, a fake in tests).
// The functions must be safe to call from many threads at once.
struct TextCodec {
  std::function<std::vector<int32_t>(const std::string&)> encode;
  std::function<std::string(const std::vector<int32_t>&)> decode;
  std::function<std::string(int32_t)> token_text;  // one token as text (logprobs "tokens")
  int64_t vocab_size = 0;
};

struct ProtocolOptions {
  std::string model_id;                  // the served model name
  int64_t max_model_len = 0;             // prompt + completion tokens at most
  int64_t max_tokens_default = 256;      // when a request gives none (capped by the context)
  std::string chat_template = "andyllm"; // see the file comment
};

enum class Endpoint { kCompletions, kChat };

// One validated request; several prompts (completions) become several engine requests.
struct ApiRequest {
  Endpoint endpoint = Endpoint::kCompletions;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::string> prompt_texts;  // the prompts as text (echo)
  SamplingParams params;                  // max_tokens checked against every prompt
  std::vector<std::string> stop;          // stop strings
  bool include_stop_str_in_output = false;
  bool echo = false;
  bool stream = false;
  bool include_usage = false;             // stream_options.include_usage
  bool logprobs = false;                  // chat: logprobs: true; completions: logprobs: k given
  int64_t top_logprobs = 0;               // alternatives per token
  bool prompt_only = false;               // completions: max_tokens 0 with echo: the prompt (and its
                                          // logprobs), nothing generated (the engine's one token dropped)
};

// POST /v1/completions and /v1/chat/completions bodies.
std::optional<ApiError> parse_completion_request(const json& body, const ProtocolOptions& opts,
                                                 const TextCodec& codec, ApiRequest* out);
std::optional<ApiError> parse_chat_request(const json& body, const ProtocolOptions& opts,
                                           const TextCodec& codec, ApiRequest* out);
// The chat prompt of `messages` (an array of {role, content}) under `template_name`; an error
// names messages[i] when a message is malformed.
std::optional<ApiError> apply_chat_template(const json& messages, const std::string& template_name,
                                            std::string* prompt);

// Turns one completion's tokens into text as they arrive: text is released only in whole UTF-8
// characters and never past a stop string that may still be completing; a stop string ends the
// text (cut before it unless include_stop). Not thread-safe (one per completion).
class TextAssembler {
 public:
  TextAssembler(const TextCodec* codec, std::vector<std::string> stop, bool include_stop);
  // Appends generated tokens (ignored once stopped); returns the text now final.
  std::string append(const std::vector<int32_t>& tokens);
  // The completion ended in the engine: the rest of the text.
  std::string finish();
  bool stopped() const { return stopped_; }       // a stop string was found
  int64_t num_tokens() const { return static_cast<int64_t>(tokens_.size()); }  // up to the stop
  const std::string& text() const { return emitted_; }  // everything released so far

 private:
  const TextCodec* codec_;
  std::vector<std::string> stop_;
  bool include_stop_;
  // The text of tokens_, decoded incrementally (vLLM's detokenize_incrementally): only the
  // tokens from prefix_offset_ on are decoded again for each new token, and the text of
  // tokens_[prefix_offset_, read_offset_) is subtracted, so a word piece's leading-space rule
  // applies as in a decode of the whole sequence. Decoding everything for every token made a
  // completion's text cost quadratic in its length.
  std::string decoded_text();

  std::vector<int32_t> tokens_;
  std::string committed_;  // text of tokens_[0, read_offset_)
  size_t prefix_offset_ = 0, read_offset_ = 0;
  std::string emitted_;
  bool stopped_ = false;
};

// Bytes at the end of `s` that are not yet a whole UTF-8 character (0 to 3), counting a trailing
// U+FFFD (a decoder's stand-in for incomplete bytes) as incomplete too.
size_t incomplete_utf8_tail(const std::string& s);

// ---- response JSON ----------------------------------------------------------------------------
struct Usage {
  int64_t prompt_tokens = 0, completion_tokens = 0;
};
json usage_json(const Usage& u);

// Logprobs of generated tokens in each endpoint's shape: completions {tokens, token_logprobs,
// top_logprobs: [{text: lp}], text_offset}; chat {content: [{token, logprob, bytes,
// top_logprobs: [{token, logprob, bytes}]}]}. `offset0`: text_offset of the first token.
json completion_logprobs_json(const std::vector<SampledToken>& sampled, const TextCodec& codec,
                              int64_t offset0);
json chat_logprobs_json(const std::vector<SampledToken>& sampled, const TextCodec& codec);
// Completions, echo + logprobs: the prompt's tokens first (the first with null logprob and
// alternatives, as OpenAI and vLLM do; the others scored by the engine), then `generated`
// (completion_logprobs_json's shape, offsets continuing after the prompt's text).
json echo_logprobs_json(const std::vector<int32_t>& prompt, const std::vector<SampledToken>& prompt_scored,
                        const std::vector<SampledToken>& generated, const TextCodec& codec, int64_t generated_offset);

// The response id ("cmpl-..." / "chatcmpl-..."), object names and the chunk shapes.
std::string response_id(Endpoint e, int64_t serial);
json completion_choice(int64_t index, const std::string& text, const json& logprobs,
                       const std::string& finish_reason);  // finish_reason "" -> null
json chat_choice(int64_t index, const std::string& content, const json& logprobs,
                 const std::string& finish_reason);
json chat_delta_choice(int64_t index, const json& delta, const json& logprobs,
                       const std::string& finish_reason);
json response_json(Endpoint e, const std::string& id, int64_t created, const std::string& model,
                   json choices, bool chunk);

}  // namespace andy::serve
