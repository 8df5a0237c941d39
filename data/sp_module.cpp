// libandyllm_sp.so: sentencepiece behind the plain interface of data/sp_module_api.h.
// Built as a MODULE (never linked), loaded by data/tokenizer.cpp with RTLD_DEEPBIND so that
// sentencepiece binds to the protobuf it bundles, not LibTorch's (docs/DEPENDENCIES.md).
// Convention: no exception leaves this file; errors come back as strings.
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <exception>
#include <string>
#include <unordered_map>

#include "data/sp_module_api.h"

namespace {

class SpModel final : public andy::sp::Model {
 public:
  sentencepiece::SentencePieceProcessor proc;

  bool encode(const std::string& text, std::vector<int>* ids, std::string* error) const override {
    try {
      auto st = proc.Encode(text, ids);
      if (!st.ok()) *error = st.ToString();
      return st.ok();
    } catch (const std::exception& e) {
      *error = e.what();
      return false;
    }
  }
  bool decode(const std::vector<int>& ids, std::string* text, std::string* error) const override {
    try {
      auto st = proc.Decode(ids, text);
      if (!st.ok()) *error = st.ToString();
      return st.ok();
    } catch (const std::exception& e) {
      *error = e.what();
      return false;
    }
  }
  int vocab_size() const override { return proc.GetPieceSize(); }
  int pad_id() const override { return proc.pad_id(); }
  int bos_id() const override { return proc.bos_id(); }
  int eos_id() const override { return proc.eos_id(); }
  int unk_id() const override { return proc.unk_id(); }
  std::string id_to_piece(int id) const override {
    if (id < 0 || id >= proc.GetPieceSize()) return "";
    return proc.IdToPiece(id);
  }
};

class SpApi final : public andy::sp::Api {
 public:
  bool train(const std::map<std::string, std::string>& kwargs, std::string* error) override {
    try {
      std::unordered_map<std::string, std::string> m(kwargs.begin(), kwargs.end());
      // Not a TrainerSpec field in sentencepiece 0.1.x: a process-wide setting.
      auto seed = m.find("random_seed");
      if (seed != m.end()) {
        sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned int>(std::stoul(seed->second)));
        m.erase(seed);
      }
      auto st = sentencepiece::SentencePieceTrainer::Train(m);
      if (!st.ok()) *error = st.ToString();
      return st.ok();
    } catch (const std::exception& e) {
      *error = e.what();
      return false;
    }
  }
  andy::sp::Model* load(const std::string& path, std::string* error) override {
    try {
      auto* m = new SpModel();
      auto st = m->proc.Load(path);
      if (!st.ok()) {
        *error = st.ToString();
        delete m;
        return nullptr;
      }
      return m;
    } catch (const std::exception& e) {
      *error = e.what();
      return nullptr;
    }
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) andy::sp::Api* andyllm_sp_api(int version) {
  if (version != andy::sp::kApiVersion) return nullptr;
  static SpApi api;
  return &api;
}
