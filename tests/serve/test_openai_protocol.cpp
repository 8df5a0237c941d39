// The OpenAI protocol layer without a model: request parsing and validation (each bad
// field named in `param`), chat templates, and the streaming text assembler (whole UTF-8
// characters, stop strings held back across tokens, stream text == whole text); the loading
// server's 503 on every route.
#include "serve/openai_protocol.h"

#include <gtest/gtest.h>
#include <httplib.h>

#include <random>

#include "serve/http_server.h"

using namespace andy::serve;

namespace {

// A byte-level codec: token i is byte i (vocab 256); decode returns the raw bytes.
TextCodec byte_codec() {
  TextCodec c;
  c.encode = [](const std::string& s) {
    std::vector<int32_t> ids;
    for (unsigned char ch : s) ids.push_back(ch);
    return ids;
  };
  c.decode = [](const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t id : ids) s += static_cast<char>(id);
    return s;
  };
  c.token_text = [](int32_t id) { return std::string(1, static_cast<char>(id)); };
  c.vocab_size = 256;
  return c;
}

ProtocolOptions options() {
  ProtocolOptions o;
  o.model_id = "tiny";
  o.max_model_len = 64;
  o.max_tokens_default = 16;
  return o;
}

std::optional<ApiError> completion(const std::string& body, ApiRequest* r) {
  static const TextCodec codec = byte_codec();
  return parse_completion_request(json::parse(body), options(), codec, r);
}

std::optional<ApiError> chat(const std::string& body, ApiRequest* r) {
  static const TextCodec codec = byte_codec();
  return parse_chat_request(json::parse(body), options(), codec, r);
}

// Feeds `text` one byte-token at a time; returns the released pieces.
std::vector<std::string> stream_of(TextAssembler& a, const std::string& text) {
  std::vector<std::string> out;
  for (unsigned char ch : text) out.push_back(a.append({static_cast<int32_t>(ch)}));
  out.push_back(a.finish());
  return out;
}

}  // namespace

TEST(OpenAiProtocol, PromptsAsStringStringsTokenIdsAndListsOfTokenIds) {
  ApiRequest r;
  ASSERT_FALSE(completion(R"({"prompt": "ab"})", &r));
  EXPECT_EQ(r.prompts, (std::vector<std::vector<int32_t>>{{97, 98}}));
  EXPECT_EQ(r.params.max_tokens, 16);  // the default
  ASSERT_FALSE(completion(R"({"prompt": ["a", "bc"], "max_tokens": 3})", &r));
  EXPECT_EQ(r.prompts.size(), 2u);
  EXPECT_EQ(r.params.max_tokens, 3);
  ASSERT_FALSE(completion(R"({"prompt": [97, 98, 99]})", &r));
  EXPECT_EQ(r.prompts, (std::vector<std::vector<int32_t>>{{97, 98, 99}}));
  EXPECT_EQ(r.prompt_texts[0], "abc");
  ASSERT_FALSE(completion(R"({"prompt": [[97], [98, 99]]})", &r));
  EXPECT_EQ(r.prompts.size(), 2u);
}

TEST(OpenAiProtocol, SamplingFieldsAreRead) {
  ApiRequest r;
  ASSERT_FALSE(completion(R"({"prompt": "a", "temperature": 0, "top_p": 0.5, "top_k": 3, "min_p": 0.1,
      "seed": 7, "n": 2, "stop": "x", "stop_token_ids": [5], "ignore_eos": true, "presence_penalty": 0.5,
      "frequency_penalty": 0.25, "repetition_penalty": 1.1, "logit_bias": {"12": -100}, "logprobs": 2,
      "echo": true, "user": "u", "stream": true, "stream_options": {"include_usage": true}})", &r));
  EXPECT_EQ(r.params.temperature, 0);
  EXPECT_EQ(r.params.top_p, 0.5);
  EXPECT_EQ(r.params.top_k, 3);
  EXPECT_EQ(r.params.min_p, 0.1);
  EXPECT_EQ(r.params.seed, 7);
  EXPECT_EQ(r.params.n, 2);
  EXPECT_EQ(r.stop, std::vector<std::string>{"x"});
  EXPECT_EQ(r.params.stop_token_ids, std::vector<int32_t>{5});
  EXPECT_TRUE(r.params.ignore_eos);
  EXPECT_EQ(r.params.logit_bias.at(12), -100);
  EXPECT_EQ(r.params.logprobs, 2);
  EXPECT_TRUE(r.echo && r.stream && r.include_usage);
}

TEST(OpenAiProtocol, BadFieldsAreNamedInParam) {
  struct Case {
    std::string body, param;
    int status;
  };
  const std::vector<Case> cases = {
      {R"({"prompt": "a", "suffix": "z"})", "suffix", 400},
      {R"({"prompt": "a", "temperature": -1})", "temperature", 400},
      {R"({"prompt": "a", "temperature": "hot"})", "temperature", 400},
      {R"({"prompt": "a", "top_p": 0})", "top_p", 400},
      {R"({"prompt": "a", "n": 0})", "n", 400},
      {R"({"prompt": "a", "max_tokens": 0})", "max_tokens", 400},
      {R"({"prompt": "a", "logprobs": 50})", "logprobs", 400},
      {R"({"prompt": "a", "stop": 3})", "stop", 400},
      {R"({"prompt": "a", "logit_bias": {"999": 1}})", "logit_bias", 400},
      {R"({"prompt": "a", "stream_options": {"include_usage": true}})", "stream_options", 400},
      {R"({"prompt": [300]})", "prompt", 400},
      {R"({"prompt": []})", "prompt", 400},
      {R"({"prompt": ""})", "prompt", 400},
      {R"({})", "prompt", 400},
      {R"({"prompt": "a", "model": "other"})", "model", 404},
  };
  for (const Case& c : cases) {
    ApiRequest r;
    auto e = completion(c.body, &r);
    ASSERT_TRUE(e) << c.body;
    EXPECT_EQ(e->param, c.param) << c.body << " -> " << e->message;
    EXPECT_EQ(e->status, c.status) << c.body;
    json b = error_body(*e);
    EXPECT_TRUE(b["error"].contains("message") && b["error"].contains("type") && b["error"].contains("code")) << b;
  }
}

TEST(OpenAiProtocol, ContextLengthErrorUsesVllmWording) {
  ApiRequest r;
  auto e = completion(R"({"prompt": "abcdefghij", "max_tokens": 60})", &r);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->message,
            "This model's maximum context length is 64 tokens. However, you requested 70 tokens (10 in the "
            "messages, 60 in the completion). Please reduce the length of the messages or completion.");
  // Without max_tokens the default is capped by the room left.
  ASSERT_FALSE(completion(R"({"prompt": "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzabcdefgh"})", &r));
  EXPECT_EQ(r.params.max_tokens, 4);
}

TEST(OpenAiProtocol, ChatTemplatesAndChatFields) {
  std::string p;
  const json msgs = json::parse(R"([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])");
  ASSERT_FALSE(apply_chat_template(msgs, "andyllm", &p));
  EXPECT_EQ(p, "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n");
  ASSERT_FALSE(apply_chat_template(msgs, "plain", &p));
  EXPECT_EQ(p, "Be brief.\nHi");
  auto e = apply_chat_template(json::parse(R"([{"role": "robot", "content": "x"}])"), "andyllm", &p);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "messages");

  ApiRequest r;
  ASSERT_FALSE(chat(R"({"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": 4,
                        "logprobs": true, "top_logprobs": 3})", &r));
  EXPECT_EQ(r.endpoint, Endpoint::kChat);
  EXPECT_EQ(r.params.max_tokens, 4);
  EXPECT_EQ(r.params.logprobs, 3);
  EXPECT_EQ(r.prompt_texts[0], "<|user|>\na\n<|assistant|>\n");
  e = chat(R"({"messages": [{"role": "user", "content": "a"}], "chat_template": "{{x}}"})", &r);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "chat_template");
  e = chat(R"({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2})", &r);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "top_logprobs");
  e = chat(R"({"messages": []})", &r);
  ASSERT_TRUE(e);
  EXPECT_EQ(e->param, "messages");
}

TEST(TextAssembler, ReleasesWholeUtf8CharactersOnly) {
  const TextCodec codec = byte_codec();
  TextAssembler a(&codec, {}, false);
  const std::string text = "a你好😀b";
  std::string joined;
  for (const std::string& piece : stream_of(a, text)) {
    EXPECT_EQ(incomplete_utf8_tail(piece), 0u) << "a piece ends inside a character";
    joined += piece;
  }
  EXPECT_EQ(joined, text);
  EXPECT_EQ(incomplete_utf8_tail("ab\xE4\xBD"), 2u);
  EXPECT_EQ(incomplete_utf8_tail("ab\xEF\xBF\xBD"), 3u);  // U+FFFD: a decoder's placeholder
  EXPECT_EQ(incomplete_utf8_tail("ab你"), 0u);
}

TEST(TextAssembler, StopStringsAreHeldBackAcrossTokensAndCutTheText) {
  const TextCodec codec = byte_codec();
  TextAssembler a(&codec, {"END", "xyz"}, false);
  auto pieces = stream_of(a, "hello ENxENDmore");
  std::string joined;
  for (const auto& p : pieces) joined += p;
  EXPECT_EQ(joined, "hello ENx");
  EXPECT_TRUE(a.stopped());
  EXPECT_EQ(a.num_tokens(), 12);  // up to and including the D of END
  // "EN" held back while it may become "END": released only when it cannot.
  TextAssembler b(&codec, {"END"}, false);
  EXPECT_EQ(b.append({'a'}), "a");
  EXPECT_EQ(b.append({'E'}), "");
  EXPECT_EQ(b.append({'N'}), "");
  EXPECT_EQ(b.append({'x'}), "ENx");
  // include_stop_str_in_output keeps the stop string.
  TextAssembler c(&codec, {"END"}, true);
  std::string all;
  for (const auto& p : stream_of(c, "abENDcd")) all += p;
  EXPECT_EQ(all, "abEND");
  // The engine finishing releases what was held back.
  TextAssembler d(&codec, {"END"}, false);
  EXPECT_EQ(d.append({'a', 'E'}), "a");
  EXPECT_EQ(d.finish(), "E");
  EXPECT_EQ(d.text(), "aE");
}

// A sentencepiece-like codec: word pieces marked with U+2581 for a leading space, which the
// decoder turns into a space and drops at the very start of what it decodes; byte tokens for
// the bytes of a character (so a character can span tokens).
TextCodec piece_codec() {
  static const std::string m = "\xE2\x96\x81";  // U+2581
  static const std::vector<std::string> pieces = {m + "the", m + "cat", "s", m, "at", "\xE4", "\xBD", "\xA0",
                                                  m + "sat", "!", "\xF0\x9F", "\x98\x80"};
  TextCodec c;
  c.decode = [](const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t id : ids) s += pieces[static_cast<size_t>(id)];
    std::string out;
    const std::string mark = "\xE2\x96\x81";
    for (size_t i = 0; i < s.size();) {
      if (s.compare(i, mark.size(), mark) == 0) {
        if (!out.empty() || i > 0) out += ' ';
        i += mark.size();
      } else {
        out += s[i++];
      }
    }
    return out;
  };
  c.token_text = [](int32_t id) { return pieces[static_cast<size_t>(id)]; };
  c.vocab_size = static_cast<int64_t>(pieces.size());
  return c;
}

// The text released token by token (decoded incrementally, a window at a time) equals the decode
// of the whole sequence, for random sequences that start with and without a leading-space piece
// and split characters over tokens; each piece is whole UTF-8.
TEST(TextAssembler, IncrementalTextEqualsTheWholeDecode) {
  const TextCodec codec = piece_codec();
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    std::vector<int32_t> ids;
    const int n = 1 + static_cast<int>(rng() % 40);
    while (static_cast<int>(ids.size()) < n) {
      const int32_t t = static_cast<int32_t>(rng() % 12);
      if (t == 5) ids.insert(ids.end(), {5, 6, 7});         // 你, three byte tokens
      else if (t == 10) ids.insert(ids.end(), {10, 11});   // 😀, two
      else if (t != 6 && t != 7 && t != 11) ids.push_back(t);
    }
    TextAssembler a(&codec, {}, false);
    std::string joined;
    for (int32_t id : ids) {
      const std::string piece = a.append({id});
      EXPECT_EQ(incomplete_utf8_tail(piece), 0u);
      joined += piece;
    }
    joined += a.finish();
    ASSERT_EQ(joined, codec.decode(ids)) << "trial " << trial;
  }
}

TEST(OpenAiProtocol, LogprobsShapes) {
  const TextCodec codec = byte_codec();
  std::vector<SampledToken> s = {{97, -0.5, {{97, -0.5}, {98, -1.5}}}, {98, -0.25, {{98, -0.25}, {97, -2.0}}}};
  json c = completion_logprobs_json(s, codec, 3);
  EXPECT_EQ(c["tokens"], json::parse(R"(["a", "b"])"));
  EXPECT_EQ(c["token_logprobs"], json::parse("[-0.5, -0.25]"));
  EXPECT_EQ(c["top_logprobs"][0]["b"], -1.5);
  EXPECT_EQ(c["text_offset"], json::parse("[3, 4]"));
  json h = chat_logprobs_json(s, codec);
  EXPECT_EQ(h["content"][1]["token"], "b");
  EXPECT_EQ(h["content"][1]["bytes"], json::parse("[98]"));
  EXPECT_EQ(h["content"][1]["top_logprobs"][1]["token"], "a");
}

// While the model loads, rank 0 answers every route with 503 and an OpenAI error object.
TEST(LoadingServer, AnswersServiceUnavailableEverywhere) {
  LoadingServer loading("127.0.0.1", 0);
  ASSERT_GT(loading.port(), 0);
  httplib::Client c("127.0.0.1", loading.port());
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 503);
  auto r = c.Post("/v1/completions", R"({"prompt": "a"})", "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 503);
  EXPECT_EQ(json::parse(r->body)["error"]["type"], "service_unavailable");
  const int port = loading.port();
  loading.close();
  httplib::Client after("127.0.0.1", port);
  EXPECT_FALSE(after.Get("/health")) << "closed: the port is free for the real server";
}
