// Tokenizer: a sentencepiece model (BPE or unigram) reached through our dlopen'ed module
// (data/sp_module_api.h), never by linking sentencepiece into a LibTorch process.
//
// Special ids (fixed by training here; a model trained elsewhere keeps its own, read back
// by pad_id()/bos_id()/eos_id()/unk_id()):  pad = 0, unk = 1, bos = 2, eos = 3.
// eos ends every document in the shards; bos is reserved for callers (the server's prompts).
//
// Normalization: sentencepiece runs with the "identity" rule, remove_extra_whitespaces off and
// byte fallback on, so decode(encode(s)) == s for every valid UTF-8 string, CJK and emoji
// included (a character outside the vocabulary becomes its UTF-8 bytes <0xNN>, never <unk>).
// The text-level normalization applied before that is in data/text_input.h.
//
// Thread-safety: a loaded Tokenizer is immutable; encode/decode may run on many threads.
//
//   Tokenizer tok = Tokenizer::load("data/demo/processed/tokenizer.model");
//   std::vector<int32_t> ids = tok.encode("你好, world");
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "data/sp_module_api.h"

namespace andy::data {

constexpr int kPadId = 0;
constexpr int kUnkId = 1;
constexpr int kBosId = 2;
constexpr int kEosId = 3;
// Texts longer than this are encoded in pieces (see Tokenizer::encode). Default: 1 MiB.
constexpr size_t kEncodePieceBytes = 1 << 20;

struct TokenizerTrainOptions {
  std::vector<std::string> input_files;   // UTF-8 text, one sentence per line
  std::string model_prefix;               // writes <prefix>.model and <prefix>.vocab
  int vocab_size = 32000;                 // Default: 32000
  std::string model_type = "bpe";         // "bpe" (default) or "unigram"
  double character_coverage = 0.9995;     // Default: 0.9995 (sentencepiece's advice for CJK)
  int64_t input_sentence_size = 2000000;  // sentences sampled for training. Default: 2M
  int num_threads = 1;
  uint32_t seed = 1234;
};

class Tokenizer {
 public:
  // Loads a .model file. Throws IoError naming the file when it is missing or unreadable,
  // or when the sentencepiece module cannot be loaded (the message says where it looked).
  static Tokenizer load(const std::string& path);
  // Trains a model. Throws ConfigError when the corpus cannot support `vocab_size` (with the
  // largest size sentencepiece reports possible), IoError for file problems.
  static void train(const TokenizerTrainOptions& opts);

  // The ids of `text`. For a BPE model whose pieces never join a character to a space after it
  // (sp::WordSplit: every BPE model andyllm preprocess trains, and sentencepiece's defaults) the
  // text is encoded word by word, each word (with the spaces before it) once per thread and
  // then taken from the thread's cache, as Hugging Face's BPE does: the same ids as
  // sentencepiece encoding the whole text, with far fewer calls into it.
  // ANDYLLM_TOKENIZER_WORD_CACHE=0 (read by load()) encodes whole texts.
  // Encoded words, for callers that keep one per worker across short-lived threads
  // (preprocess's encoding batches). One thread at a time; for one tokenizer at a time.
  class WordCache {
   public:
    // When full (about 100 bytes a word), the cache starts over. The default (64 Ki words, about
    // 7 MB) is what each thread's own cache gets: a server has many threads.
    explicit WordCache(size_t max_words = size_t{1} << 16) : max_words_(max_words) {}

   private:
    friend class Tokenizer;
    size_t max_words_;
    uint64_t owner_ = 0;  // Tokenizer::instance_
    std::unordered_map<std::string, std::vector<int32_t>> words_;
    std::vector<std::string> fresh_;  // words added since share_words()
  };
  // Gives each cache the words the others encoded since the last call (while no thread uses
  // them), so that workers do not each encode the same new words.
  static void share_words(std::vector<WordCache>& caches);
  // cache: where the words go; nullptr: the calling thread's own.
  std::vector<int32_t> encode(const std::string& text, WordCache* cache = nullptr) const;
  // True when encode() goes word by word through the cache.
  bool word_cache() const { return word_split_ != sp::WordSplit::kNone; }
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string id_to_piece(int id) const;

  int vocab_size() const { return vocab_size_; }
  int pad_id() const { return pad_id_; }
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  const std::string& path() const { return path_; }
  // file_checksum() of the .model file: what shards and the loader compare.
  const std::string& checksum() const { return checksum_; }

 private:
  // Appends the ids of text (at most kEncodePieceBytes) through `cache`.
  void encode_words(const std::string& text, WordCache& cache, std::vector<int32_t>& out) const;

  std::shared_ptr<const sp::Model> model_;
  sp::WordSplit word_split_ = sp::WordSplit::kNone;
  uint64_t instance_ = 0;  // tells the thread-local word caches of two tokenizers apart
  std::string path_, checksum_;
  int vocab_size_ = 0, pad_id_ = -1, bos_id_ = -1, eos_id_ = -1, unk_id_ = -1;
};

// Where the sentencepiece module was loaded from (loads it on first call). Search order:
// $ANDYLLM_SP_MODULE, libandyllm_sp.so beside the running executable, the build tree's copy.
std::string sentencepiece_module_path();

}  // namespace andy::data
