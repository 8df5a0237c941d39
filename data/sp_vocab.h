// SpVocab: the vocabulary and settings of a sentencepiece .model file, read with our own
// protobuf wire reader (data/protobuf_wire.h): no sentencepiece, protobuf or LibTorch, so
// exporters (Hugging Face tokenizer files, GGUF) can run anywhere.
//
// Convention: fields absent from the file take sentencepiece_model.proto's (proto2) defaults,
// so a vocabulary read here says what sentencepiece itself would do: unk 0, bos 1, eos 2, no pad,
// model type unigram, add_dummy_prefix and remove_extra_whitespaces on, byte_fallback off.
//
//   SpVocab v = read_sp_vocab("data/demo/processed/tokenizer.model");
//   for (size_t id = 0; id < v.pieces.size(); ++id) use(v.pieces[id].piece, v.pieces[id].type);
#pragma once

#include <string>
#include <vector>

namespace andy::data {

// sentencepiece's ModelProto.SentencePiece.Type; GGUF's llama token types use the same numbers.
enum class PieceType : int {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

struct SpPiece {
  std::string piece;
  float score = 0;
  PieceType type = PieceType::kNormal;
};

struct SpVocab {
  std::vector<SpPiece> pieces;   // by id
  std::string model_type;        // "unigram" | "bpe" | "word" | "char" (TrainerSpec.model_type)
  bool byte_fallback = false;    // TrainerSpec.byte_fallback
  bool add_dummy_prefix = true;  // NormalizerSpec.add_dummy_prefix
  bool remove_extra_whitespaces = true;  // NormalizerSpec.remove_extra_whitespaces
  std::string normalizer_name;           // NormalizerSpec.name ("identity", "nmt_nfkc", ...)
  int unk_id = -1, bos_id = -1, eos_id = -1, pad_id = -1;  // from TrainerSpec (-1 = none)

  // The piece with that id, or "" for -1 (none).
  const std::string& piece_of(int id) const;
};

// Reads a sentencepiece .model file (a serialized ModelProto). Throws IoError naming the file
// when it is missing or unreadable, or malformed: not protobuf, cut short (no trainer or
// normalizer spec), no pieces, a special id outside the vocabulary, an unknown piece type.
SpVocab read_sp_vocab(const std::string& model_file);

}  // namespace andy::data
