// read_sp_vocab: walks a serialized sentencepiece ModelProto with data/protobuf_wire.h.
// Field numbers are those of sentencepiece's src/sentencepiece_model.proto (named below);
// unknown fields (extensions, the self-test data, the denormalizer) are skipped.
#include "data/sp_vocab.h"

#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/base/error.h"
#include "data/protobuf_wire.h"

namespace andy::data {

namespace {

namespace wire = andy::data::wire;

// ModelProto
constexpr uint32_t kModelPieces = 1, kModelTrainerSpec = 2, kModelNormalizerSpec = 3;
// ModelProto.SentencePiece
constexpr uint32_t kPiecePiece = 1, kPieceScore = 2, kPieceType = 3;
// TrainerSpec
constexpr uint32_t kTrainerModelType = 3, kTrainerByteFallback = 35, kTrainerUnkId = 40,
                   kTrainerBosId = 41, kTrainerEosId = 42, kTrainerPadId = 43;
// NormalizerSpec
constexpr uint32_t kNormName = 1, kNormAddDummyPrefix = 3, kNormRemoveExtraWhitespaces = 4;

// Thrown inside the parser, turned into an IoError naming the file by read_sp_vocab.
struct Malformed {
  std::string what;
};

// Calls on_field(field) for every field of `msg`, a `message` (named in errors).
template <typename OnField>
void for_each_field(std::string_view msg, const char* message, OnField&& on_field) {
  for (size_t i = 0; i < msg.size();) {
    const size_t at = i;
    wire::Field f;
    if (!wire::next_field(msg, i, f))
      throw Malformed{std::string("bad protobuf field in ") + message + " at byte " +
                      std::to_string(at)};
    on_field(f);
  }
}

// f, checked to have the wire type its field number has in `message`.
const wire::Field& typed(const wire::Field& f, int wire_type, const char* message) {
  if (f.wire_type() != wire_type)
    throw Malformed{std::string(message) + " field " + std::to_string(f.number()) +
                    " has wire type " + std::to_string(f.wire_type()) + ", expected " +
                    std::to_string(wire_type)};
  return f;
}

SpPiece parse_piece(std::string_view msg) {
  const char* m = "SentencePiece";
  SpPiece p;
  for_each_field(msg, m, [&](const wire::Field& f) {
    switch (f.number()) {
      case kPiecePiece:
        p.piece = wire::payload_of(msg, typed(f, wire::kLengthDelimited, m));
        break;
      case kPieceScore:
        p.score = typed(f, wire::kFixed32, m).as_float();
        break;
      case kPieceType:
        if (typed(f, wire::kVarint, m).value < 1 || f.value > 6)
          throw Malformed{"piece type " + std::to_string(f.value) + " is not one of 1..6"};
        p.type = static_cast<PieceType>(f.value);
        break;
    }
  });
  return p;
}

void parse_trainer_spec(std::string_view msg, SpVocab& v) {
  const char* m = "TrainerSpec";
  for_each_field(msg, m, [&](const wire::Field& f) {
    switch (f.number()) {
      case kTrainerModelType: {
        static const char* names[] = {"", "unigram", "bpe", "word", "char"};
        if (typed(f, wire::kVarint, m).value < 1 || f.value > 4)
          throw Malformed{"model type " + std::to_string(f.value) + " is not one of 1..4"};
        v.model_type = names[f.value];
        break;
      }
      case kTrainerByteFallback:
        v.byte_fallback = typed(f, wire::kVarint, m).value != 0;
        break;
      case kTrainerUnkId:
        v.unk_id = typed(f, wire::kVarint, m).as_int32();
        break;
      case kTrainerBosId:
        v.bos_id = typed(f, wire::kVarint, m).as_int32();
        break;
      case kTrainerEosId:
        v.eos_id = typed(f, wire::kVarint, m).as_int32();
        break;
      case kTrainerPadId:
        v.pad_id = typed(f, wire::kVarint, m).as_int32();
        break;
    }
  });
}

void parse_normalizer_spec(std::string_view msg, SpVocab& v) {
  const char* m = "NormalizerSpec";
  for_each_field(msg, m, [&](const wire::Field& f) {
    switch (f.number()) {
      case kNormName:
        v.normalizer_name = wire::payload_of(msg, typed(f, wire::kLengthDelimited, m));
        break;
      case kNormAddDummyPrefix:
        v.add_dummy_prefix = typed(f, wire::kVarint, m).value != 0;
        break;
      case kNormRemoveExtraWhitespaces:
        v.remove_extra_whitespaces = typed(f, wire::kVarint, m).value != 0;
        break;
    }
  });
}

SpVocab parse_model(std::string_view model) {
  SpVocab v;
  // proto2 defaults of the fields read here (sentencepiece_model.proto).
  v.model_type = "unigram";
  v.unk_id = 0, v.bos_id = 1, v.eos_id = 2, v.pad_id = -1;
  bool has_trainer = false, has_normalizer = false;
  const char* m = "ModelProto";
  for_each_field(model, m, [&](const wire::Field& f) {
    switch (f.number()) {
      case kModelPieces:
        v.pieces.push_back(
            parse_piece(wire::payload_of(model, typed(f, wire::kLengthDelimited, m))));
        break;
      case kModelTrainerSpec:
        has_trainer = true;
        parse_trainer_spec(wire::payload_of(model, typed(f, wire::kLengthDelimited, m)), v);
        break;
      case kModelNormalizerSpec:
        has_normalizer = true;
        parse_normalizer_spec(wire::payload_of(model, typed(f, wire::kLengthDelimited, m)), v);
        break;
    }
  });
  if (v.pieces.empty()) throw Malformed{"no pieces"};
  if (!has_trainer || !has_normalizer)
    throw Malformed{std::string("no ") + (has_trainer ? "normalizer" : "trainer") +
                    " spec (is the file cut short?)"};
  for (size_t id = 0; id < v.pieces.size(); ++id)
    if (v.pieces[id].piece.empty()) throw Malformed{"piece " + std::to_string(id) + " is empty"};
  const std::pair<const char*, int> specials[] = {
      {"unk", v.unk_id}, {"bos", v.bos_id}, {"eos", v.eos_id}, {"pad", v.pad_id}};
  for (const auto& [name, id] : specials)
    if (id < -1 || id >= static_cast<int>(v.pieces.size()))
      throw Malformed{std::string(name) + "_id " + std::to_string(id) + " is outside the " +
                      std::to_string(v.pieces.size()) + " pieces"};
  return v;
}

}  // namespace

const std::string& SpVocab::piece_of(int id) const {
  static const std::string none;
  return id >= 0 && id < static_cast<int>(pieces.size()) ? pieces[id].piece : none;
}

SpVocab read_sp_vocab(const std::string& model_file) {
  ANDY_CHECK_T(IoError, std::filesystem::is_regular_file(model_file), "tokenizer ", model_file,
               ": no such file (expected a sentencepiece .model)");
  std::ifstream in(model_file, std::ios::binary);
  std::string bytes(std::istreambuf_iterator<char>(in), {});
  ANDY_CHECK_T(IoError, in.good() || in.eof(), "tokenizer ", model_file, ": cannot read it");
  try {
    return parse_model(bytes);
  } catch (const Malformed& m) {
    ANDY_THROW(IoError, "tokenizer ", model_file, ": not a readable sentencepiece model: ", m.what);
  }
}

}  // namespace andy::data
