// The plain C++ interface between andyllm_data and libandyllm_sp.so, our small module that
// holds sentencepiece. Debian's libsentencepiece bundles its own protobuf, which crashes a
// process that also links LibTorch's libprotobuf (docs/DEPENDENCIES.md); so sentencepiece is
// only ever reached through this header, from a module loaded with
// dlopen(RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND) by data/tokenizer.cpp.
// Convention: nothing here throws across the module boundary; every call returns false and
// fills *error with sentencepiece's own message.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace andy::sp {

// Bumped whenever a virtual below changes; andyllm_sp_api() refuses other versions.
constexpr int kApiVersion = 3;

// How encode(text) splits into encodings of its words (a BPE model whose pieces never join a
// character to a "▁" after it; data/sp_module.cpp says how that is read from the model):
enum class WordSplit {
  kNone,        // not at all: encode whole texts
  kEverySpace,  // before every space, each piece with encode() (removes extra whitespace)
  kSpaceRuns,   // before every run of spaces that follows something else; the first piece with
                // encode(), the others with encode_continuation() (keeps every space)
};

// A loaded sentencepiece model. Thread-safe for concurrent encode/decode (const).
class Model {
 public:
  virtual ~Model() = default;
  virtual bool encode(const std::string& text, std::vector<int>* ids, std::string* error) const = 0;
  virtual bool decode(const std::vector<int>& ids, std::string* text, std::string* error) const = 0;
  // Encodes text that continues a text already encoded (no dummy "▁" prefix added), so a long
  // document encoded in pieces decodes to exactly its text.
  virtual bool encode_continuation(const std::string& text, std::vector<int>* ids, std::string* error) const = 0;
  // How a text may be encoded word by word with the same ids (see WordSplit).
  virtual WordSplit word_split() const = 0;
  virtual int vocab_size() const = 0;
  virtual int pad_id() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
  virtual int unk_id() const = 0;
  virtual std::string id_to_piece(int id) const = 0;
};

class Api {
 public:
  virtual ~Api() = default;
  // SentencePieceTrainer::Train with its kwargs ({"input", "a.txt,b.txt"}, {"vocab_size", "4096"}).
  virtual bool train(const std::map<std::string, std::string>& kwargs, std::string* error) = 0;
  // Loads a .model file; nullptr (and *error) on failure. The caller owns the result.
  virtual Model* load(const std::string& path, std::string* error) = 0;
};

}  // namespace andy::sp

// The module's one exported symbol. Returns a process-lifetime Api, or nullptr when `version`
// differs from the module's kApiVersion.
extern "C" andy::sp::Api* andyllm_sp_api(int version);
using AndyllmSpApiFn = andy::sp::Api* (*)(int);
