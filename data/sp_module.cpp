// libandyllm_sp.so: sentencepiece behind the plain interface of data/sp_module_api.h.
// Built as a MODULE (never linked), loaded by data/tokenizer.cpp with RTLD_DEEPBIND so that
// sentencepiece binds to the protobuf it bundles, not LibTorch's (docs/DEPENDENCIES.md).
// Convention: no exception leaves this file; errors come back as strings.
// <cstdint> first: Debian's sentencepiece headers use uint32_t without including it, which
// libstdc++ 13 no longer provides through <string> and <vector>.
#include <cstdint>

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <exception>
#include <string>
#include <unordered_map>

#include "data/protobuf_wire.h"
#include "data/sp_module_api.h"

namespace {

namespace wire = andy::data::wire;

// ModelProto (field 3: normalizer_spec) with NormalizerSpec.add_dummy_prefix (field 3) = false.
bool without_dummy_prefix(const std::string& model, std::string& out) {
  for (size_t i = 0; i < model.size();) {
    const size_t start = i;
    wire::Field f;
    if (!wire::next_field(model, i, f)) return false;
    if (f.tag != ((3 << 3) | wire::kLengthDelimited)) {  // not the normalizer spec: as it is
      out.append(model, start, i - start);
      continue;
    }
    const std::string_view spec_in = wire::payload_of(model, f);
    std::string spec;  // its fields but add_dummy_prefix, then add_dummy_prefix = false
    for (size_t j = 0; j < spec_in.size();) {
      const size_t field = j;
      wire::Field g;
      if (!wire::next_field(spec_in, j, g)) return false;
      if (g.number() != 3) spec.append(spec_in.substr(field, j - field));
    }
    spec += '\x18';  // field 3, varint
    spec += '\x00';  // false
    wire::write_varint(out, f.tag);
    wire::write_varint(out, spec.size());
    out += spec;
  }
  return true;
}

// Runs a sentencepiece call returning a Status: its error text into *error; no exception leaves.
template <typename Call>
bool status_of(Call&& call, std::string* error) {
  try {
    const auto st = call();
    if (!st.ok()) *error = st.ToString();
    return st.ok();
  } catch (const std::exception& e) {
    *error = e.what();
    return false;
  }
}

class SpModel final : public andy::sp::Model {
 public:
  sentencepiece::SentencePieceProcessor proc;
  sentencepiece::SentencePieceProcessor cont;  // the same model without the dummy prefix

  bool encode_continuation(const std::string& text, std::vector<int>* ids, std::string* error) const override {
    return status_of([&] { return cont.Encode(text, ids); }, error);
  }

  bool encode(const std::string& text, std::vector<int>* ids, std::string* error) const override {
    return status_of([&] { return proc.Encode(text, ids); }, error);
  }
  bool decode(const std::vector<int>& ids, std::string* text, std::string* error) const override {
    return status_of([&] { return proc.Decode(ids, text); }, error);
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
    return status_of(
        [&] {
          std::unordered_map<std::string, std::string> m(kwargs.begin(), kwargs.end());
          // Not a TrainerSpec field in sentencepiece 0.1.x: a process-wide setting.
          auto seed = m.find("random_seed");
          if (seed != m.end()) {
            sentencepiece::SetRandomGeneratorSeed(static_cast<unsigned int>(std::stoul(seed->second)));
            m.erase(seed);
          }
          return sentencepiece::SentencePieceTrainer::Train(m);
        },
        error);
  }
  andy::sp::Model* load(const std::string& path, std::string* error) override {
    try {
      auto* m = new SpModel();
      auto st = m->proc.Load(path);
      std::string cont;
      if (st.ok() && !without_dummy_prefix(m->proc.serialized_model_proto(), cont))
        st = sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal,
                                         "cannot read the model's normalizer spec");
      if (st.ok()) st = m->cont.LoadFromSerializedProto(cont);
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
