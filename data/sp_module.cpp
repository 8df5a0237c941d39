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

// Whether, and how, encoding a text equals encoding its words apart and joining the ids (what
// Tokenizer's word cache relies on): a BPE model never merges two symbols into something that
// is not a piece, so where no piece can span a place in the text, nothing is merged across it.
// Read from the serialized ModelProto (field numbers of sentencepiece_model.proto):
// - trainer_spec (2): model_type (3) BPE (2); treat_whitespace_as_suffix (24) not true;
// - normalizer_spec (3): escape_whitespaces (5) not false (a space is "▁");
// - every piece (1; its text: field 1) holds "▁" only as its first character, or only "▁"s
//   (allow_whitespace_only_pieces): no piece joins a character to a "▁" after it.
// Then the places before a space that follows something else are such places, and
// - with remove_extra_whitespaces (4) and add_dummy_prefix (3) (sentencepiece's defaults): each
//   word with the spaces before it becomes "▁word" alone as in the text: kEverySpace;
// - without remove_extra_whitespaces, with the identity normalization (no precompiled_charsmap,
//   2: no other character becomes a space), as andyllm preprocess trains: the text's first
//   piece is encoded as it is, the others as continuations (no dummy prefix): kSpaceRuns.
andy::sp::WordSplit word_split_of(std::string_view model) {
  using andy::sp::WordSplit;
  auto fields = [](std::string_view msg, auto&& each) {
    for (size_t i = 0; i < msg.size();) {
      wire::Field f;
      if (!wire::next_field(msg, i, f)) return false;
      each(msg, f);
    }
    return true;
  };
  auto flag = [&](std::string_view msg, uint32_t number, bool dflt) {
    bool v = dflt;
    fields(msg, [&](std::string_view, const wire::Field& f) {
      if (f.number() == number && f.wire_type() == wire::kVarint) v = f.value != 0;
    });
    return v;
  };
  const std::string_view ws = "\xE2\x96\x81";  // "▁"
  bool ok = true, bpe = false, suffix = false, escape = true, dummy = true, remove_extra = true, charsmap = false;
  ok = fields(model, [&](std::string_view msg, const wire::Field& f) {
    if (f.wire_type() != wire::kLengthDelimited) return;
    const std::string_view sub = wire::payload_of(msg, f);
    if (f.number() == 1) {  // a piece
      ok = fields(sub, [&](std::string_view p, const wire::Field& g) {
             if (g.number() != 1 || g.wire_type() != wire::kLengthDelimited) return;
             const std::string_view piece = wire::payload_of(p, g);
             bool all_ws = piece.size() % ws.size() == 0;
             for (size_t k = 0; all_ws && k < piece.size(); k += ws.size()) all_ws = piece.substr(k, ws.size()) == ws;
             if (!all_ws && piece.find(ws, 1) != std::string_view::npos) ok = false;
           }) && ok;
    } else if (f.number() == 2) {
      fields(sub, [&](std::string_view, const wire::Field& g) {
        if (g.number() == 3 && g.wire_type() == wire::kVarint) bpe = g.value == 2;
      });
      suffix = flag(sub, 24, false);
    } else if (f.number() == 3) {
      dummy = flag(sub, 3, true);
      remove_extra = flag(sub, 4, true);
      escape = flag(sub, 5, true);
      fields(sub, [&](std::string_view n, const wire::Field& g) {
        if (g.number() == 2 && g.wire_type() == wire::kLengthDelimited && !wire::payload_of(n, g).empty()) charsmap = true;
      });
    }
  }) && ok;
  if (!ok || !bpe || suffix || !escape) return WordSplit::kNone;
  if (remove_extra && dummy) return WordSplit::kEverySpace;
  if (!remove_extra && !charsmap) return WordSplit::kSpaceRuns;
  return WordSplit::kNone;
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
  andy::sp::WordSplit split = andy::sp::WordSplit::kNone;  // word_split_of(the model)

  andy::sp::WordSplit word_split() const override { return split; }

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
      if (st.ok()) m->split = word_split_of(m->proc.serialized_model_proto());
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
