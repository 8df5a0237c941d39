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

#include "data/sp_module_api.h"

namespace {

// Protobuf wire-format helpers, enough to turn off NormalizerSpec.add_dummy_prefix in a
// serialized ModelProto (Debian ships no sentencepiece_model.pb.h).
bool read_varint(const std::string& s, size_t& i, uint64_t& v) {
  v = 0;
  for (int shift = 0; i < s.size() && shift < 64; shift += 7) {
    const auto b = static_cast<unsigned char>(s[i++]);
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return true;
  }
  return false;
}
void write_varint(std::string& out, uint64_t v) {
  do {
    unsigned char b = v & 0x7f;
    v >>= 7;
    out.push_back(static_cast<char>(v ? b | 0x80 : b));
  } while (v);
}
// Copies the fields of a message, dropping field `drop` (any wire type); false when malformed.
bool copy_without(const std::string& msg, uint64_t drop, std::string& out) {
  for (size_t i = 0; i < msg.size();) {
    const size_t start = i;
    uint64_t tag = 0, v = 0;
    if (!read_varint(msg, i, tag)) return false;
    switch (tag & 7) {
      case 0: if (!read_varint(msg, i, v)) return false; break;
      case 1: i += 8; break;
      case 2: if (!read_varint(msg, i, v)) return false; i += v; break;
      case 5: i += 4; break;
      default: return false;
    }
    if (i > msg.size()) return false;
    if ((tag >> 3) != drop) out.append(msg, start, i - start);
  }
  return true;
}
// ModelProto (field 3: normalizer_spec) with NormalizerSpec.add_dummy_prefix (field 3) = false.
bool without_dummy_prefix(const std::string& model, std::string& out) {
  for (size_t i = 0; i < model.size();) {
    const size_t start = i;
    uint64_t tag = 0, v = 0;
    if (!read_varint(model, i, tag)) return false;
    if ((tag & 7) == 2) {
      if (!read_varint(model, i, v) || i + v > model.size()) return false;
      if ((tag >> 3) == 3) {
        std::string spec;
        if (!copy_without(model.substr(i, v), 3, spec)) return false;
        spec += '\x18';  // field 3, varint
        spec += '\x00';  // false
        write_varint(out, tag);
        write_varint(out, spec.size());
        out += spec;
        i += v;
        continue;
      }
      i += v;
    } else if ((tag & 7) == 0) {
      if (!read_varint(model, i, v)) return false;
    } else if ((tag & 7) == 1) {
      i += 8;
    } else if ((tag & 7) == 5) {
      i += 4;
    } else {
      return false;
    }
    if (i > model.size()) return false;
    out.append(model, start, i - start);
  }
  return true;
}

class SpModel final : public andy::sp::Model {
 public:
  sentencepiece::SentencePieceProcessor proc;
  sentencepiece::SentencePieceProcessor cont;  // the same model without the dummy prefix

  bool encode_continuation(const std::string& text, std::vector<int>* ids, std::string* error) const override {
    try {
      auto st = cont.Encode(text, ids);
      if (!st.ok()) *error = st.ToString();
      return st.ok();
    } catch (const std::exception& e) {
      *error = e.what();
      return false;
    }
  }

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
