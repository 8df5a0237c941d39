// Tokenizer: loads libandyllm_sp.so once per process (dlopen with RTLD_DEEPBIND, never closed)
// and wraps its plain interface in throwing calls.
#include "data/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <regex>
#include <unordered_map>

#include "core/base/error.h"
#include "core/base/logging.h"
#include "data/checksum.h"
#include "data/sp_module_api.h"

namespace fs = std::filesystem;

namespace andy::data {

namespace {

struct ModuleState {
  sp::Api* api = nullptr;
  std::string path;
};

std::string exe_dir() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  buf[n] = 0;
  return fs::path(buf).parent_path().string();
}

const ModuleState& module() {
  static std::once_flag once;
  static ModuleState state;
  static std::string failure;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("ANDYLLM_SP_MODULE")) candidates.push_back(env);
    std::string dir = exe_dir();
    if (!dir.empty()) candidates.push_back(dir + "/libandyllm_sp.so");
#ifdef ANDYLLM_SP_MODULE_PATH
    candidates.push_back(ANDYLLM_SP_MODULE_PATH);
#endif
    std::string tried;
    for (const auto& c : candidates) {
      if (!fs::exists(c)) {
        tried += "\n  " + c + ": not found";
        continue;
      }
      void* h = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (!h) {
        tried += "\n  " + c + ": " + dlerror();
        continue;
      }
      auto fn = reinterpret_cast<AndyllmSpApiFn>(dlsym(h, "andyllm_sp_api"));
      sp::Api* api = fn ? fn(sp::kApiVersion) : nullptr;
      if (!api) {
        tried += "\n  " + c + ": not an AndyLLM sentencepiece module of API version " +
                 std::to_string(sp::kApiVersion);
        continue;
      }
      state.api = api;
      state.path = c;
      return;
    }
    failure =
        "cannot load the sentencepiece module libandyllm_sp.so (set ANDYLLM_SP_MODULE to its "
        "path); tried:" +
        tried;
  });
  ANDY_CHECK_T(IoError, state.api, failure);
  return state;
}

}  // namespace

std::string sentencepiece_module_path() { return module().path; }

Tokenizer Tokenizer::load(const std::string& path) {
  ANDY_CHECK_T(IoError, fs::is_regular_file(path), "tokenizer ", path,
               ": no such file (expected a sentencepiece .model, e.g. from andyllm preprocess)");
  std::string err;
  sp::Model* m = module().api->load(path, &err);
  ANDY_CHECK_T(IoError, m, "tokenizer ", path, ": not a readable sentencepiece model: ", err);
  Tokenizer t;
  t.model_.reset(m);
  t.path_ = path;
  t.checksum_ = file_checksum(path);
  t.vocab_size_ = m->vocab_size();
  t.pad_id_ = m->pad_id();
  t.bos_id_ = m->bos_id();
  t.eos_id_ = m->eos_id();
  t.unk_id_ = m->unk_id();
  const char* cache_env = std::getenv("ANDYLLM_TOKENIZER_WORD_CACHE");
  if (!(cache_env && std::string(cache_env) == "0")) t.word_split_ = m->word_split();
  static std::atomic<uint64_t> instances{0};
  t.instance_ = ++instances;
  ANDY_CHECK_T(
      ConfigError, t.eos_id_ >= 0, "tokenizer ", path,
      ": the model has no eos piece (documents are ended with eos); retrain it with eos_id set");
  return t;
}

void Tokenizer::train(const TokenizerTrainOptions& o) {
  ANDY_CHECK_T(ConfigError, o.model_type == "bpe" || o.model_type == "unigram", "--model_type ",
               o.model_type, ": expected bpe or unigram");
  ANDY_CHECK_T(ConfigError, !o.input_files.empty(), "tokenizer training: no input text");
  std::string inputs;
  for (const auto& f : o.input_files) inputs += (inputs.empty() ? "" : ",") + f;
  std::map<std::string, std::string> kw = {
      {"input", inputs},
      {"model_prefix", o.model_prefix},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"model_type", o.model_type},
      {"character_coverage", std::to_string(o.character_coverage)},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"allow_whitespace_only_pieces", "true"},
      {"max_sentence_length", "16384"},
      {"input_sentence_size", std::to_string(o.input_sentence_size)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(std::max(1, o.num_threads))},
      {"pad_id", std::to_string(kPadId)},
      {"unk_id", std::to_string(kUnkId)},
      {"bos_id", std::to_string(kBosId)},
      {"eos_id", std::to_string(kEosId)},
      {"random_seed", std::to_string(o.seed)},
      {"minloglevel", log::level() <= log::Level::kDebug ? "0" : "2"},
  };
  std::string err;
  if (module().api->train(kw, &err)) return;
  std::smatch m;
  if (std::regex_search(
          err, m,
          std::regex(
              "Vocabulary size too high \\((\\d+)\\)\\. Please set it to a value <= (\\d+)"))) {
    ANDY_THROW(ConfigError, "--vocab_size ", o.vocab_size,
               " is larger than this corpus can support: ", "sentencepiece can make at most ",
               m[2].str(), " pieces from it; use a smaller --vocab_size or more text");
  }
  if (std::regex_search(
          err, m,
          std::regex("Vocabulary size is smaller than required_chars\\. (\\d+) vs (\\d+)"))) {
    ANDY_THROW(ConfigError, "--vocab_size ", o.vocab_size, " is too small: the corpus needs ",
               m[2].str(),
               " pieces for its characters, 256 byte-fallback pieces and the 4 special ids; use at "
               "least that");
  }
  ANDY_THROW(ConfigError, "sentencepiece training failed: ", err);
}

namespace {

constexpr size_t kMaxCachedWordBytes = 64;       // longer pieces are encoded each time

}  // namespace

void Tokenizer::encode_words(const std::string& text, WordCache& cache, std::vector<int32_t>& out) const {
  if (cache.owner_ != instance_) {
    cache.words_.clear();
    cache.owner_ = instance_;
  }
  const bool runs = word_split_ == sp::WordSplit::kSpaceRuns;
  std::vector<int> ids;
  std::string err, word;
  // Words [start, end), cut before every space that follows neither a space nor a "▁" (U+2581,
  // which the text may hold: sentencepiece reads it as an escaped space), so a word takes the
  // whole run of spaces before it, where pieces of several "▁" may merge either way. Each word
  // is encoded alone: kEverySpace turns its leading spaces into the dummy prefix "▁", as they
  // become one "▁" in the text; with kSpaceRuns every word but the first is a continuation (no
  // dummy prefix), each of its spaces a "▁".
  static constexpr char kMeta[] = "\xE2\x96\x81";  // "▁"
  for (size_t start = 0; start < text.size();) {
    size_t end = start + 1;
    for (; end < text.size(); ++end)
      if (text[end] == ' ' && text[end - 1] != ' ' && !(end >= 3 && text.compare(end - 3, 3, kMeta) == 0)) break;
    word.assign(text, start, end - start);
    const bool first = start == 0;
    start = end;
    // The first word of a kSpaceRuns text is encoded differently from the same word later.
    const bool cacheable = word.size() <= kMaxCachedWordBytes && !(runs && first);
    auto hit = cacheable ? cache.words_.find(word) : cache.words_.end();
    if (hit != cache.words_.end()) {
      out.insert(out.end(), hit->second.begin(), hit->second.end());
      continue;
    }
    ids.clear();
    const bool ok = runs && !first ? model_->encode_continuation(word, &ids, &err) : model_->encode(word, &ids, &err);
    ANDY_CHECK_T(Error, ok, "tokenizer ", path_, ": encode failed: ", err);
    std::vector<int32_t> encoded(ids.begin(), ids.end());
    out.insert(out.end(), encoded.begin(), encoded.end());
    if (cacheable) {
      if (cache.words_.size() >= cache.max_words_) {
        cache.words_.clear();
        cache.fresh_.clear();
      }
      cache.words_.emplace(word, std::move(encoded));
      cache.fresh_.push_back(word);
    }
  }
}

void Tokenizer::share_words(std::vector<WordCache>& caches) {
  for (WordCache& from : caches) {
    for (const std::string& word : from.fresh_) {
      auto it = from.words_.find(word);
      if (it == from.words_.end()) continue;
      for (WordCache& to : caches)
        if (&to != &from && to.owner_ == from.owner_ && to.words_.size() < to.max_words_) to.words_.emplace(word, it->second);
    }
  }
  for (WordCache& c : caches) c.fresh_.clear();
}

std::vector<int32_t> Tokenizer::encode(const std::string& text, WordCache* cache) const {
  std::vector<int32_t> out;
  if (word_split_ != sp::WordSplit::kNone && text.size() <= kEncodePieceBytes) {
    thread_local WordCache own;
    encode_words(text, cache ? *cache : own, out);
    return out;
  }
  std::vector<int> ids;
  std::string err;
  // Long texts in pieces of about kEncodePieceBytes, cut after a newline (else a space, else a
  // UTF-8 character boundary): sentencepiece's memory grows steeply with the length of one
  // input (a 50 MB line peaked at 4.5 GB). Pieces after the first are encoded without the dummy
  // prefix, so decode(encode(text)) == text still holds.
  for (size_t at = 0; at < text.size() || at == 0;) {
    size_t end = text.size();
    if (end - at > kEncodePieceBytes) {
      end = at + kEncodePieceBytes;
      size_t cut = text.rfind('\n', end - 1);
      if (cut == std::string::npos || cut < at + kEncodePieceBytes / 2) cut = text.rfind(' ', end - 1);
      if (cut != std::string::npos && cut >= at + kEncodePieceBytes / 2) {
        end = cut + 1;
      } else {
        while (end > at + 1 && (static_cast<unsigned char>(text[end]) & 0xC0) == 0x80) --end;
      }
    }
    const std::string piece = text.substr(at, end - at);
    ids.clear();
    const bool ok = at == 0 ? model_->encode(piece, &ids, &err) : model_->encode_continuation(piece, &ids, &err);
    ANDY_CHECK_T(Error, ok, "tokenizer ", path_, ": encode failed: ", err);
    out.insert(out.end(), ids.begin(), ids.end());
    at = end;
    if (text.empty()) break;
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out, err;
  std::vector<int> v(ids.begin(), ids.end());
  ANDY_CHECK_T(Error, model_->decode(v, &out, &err), "tokenizer ", path_, ": decode failed: ", err);
  return out;
}

std::string Tokenizer::id_to_piece(int id) const { return model_->id_to_piece(id); }

}  // namespace andy::data
