// Hugging Face tokenizer files from a sentencepiece vocabulary (data/hf_tokenizer.h says what
// each holds and why). tokenizer.json keeps the key order the tokenizers library writes;
// tokenizer_config.json and special_tokens_map.json are sorted, as transformers writes them.
#include "data/hf_tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string_view>
#include <unordered_map>

#include "core/base/durable_fs.h"
#include "core/base/error.h"

namespace fs = std::filesystem;

namespace andy::data {

namespace {

using ojson = nlohmann::ordered_json;
using json = nlohmann::json;

const char* const kSpaceSymbol = "\xe2\x96\x81";  // "▁", sentencepiece's escaped space

// Pieces sentencepiece's BPE may merge into and out of (its pieces_ map): never control,
// unknown or byte pieces.
bool mergeable(PieceType t) {
  return t == PieceType::kNormal || t == PieceType::kUserDefined || t == PieceType::kUnused;
}

void check_exportable(const SpVocab& v) {
  ANDY_CHECK_T(ConfigError, v.model_type == "bpe", "tokenizer.json: the sentencepiece model is ",
               v.model_type, ", only bpe models can be exported (train with --model_type bpe)");
  ANDY_CHECK_T(
      ConfigError, v.normalizer_name.empty() || v.normalizer_name == "identity",
      "tokenizer.json: the sentencepiece model normalizes text with the '", v.normalizer_name,
      "' rule; only 'identity' (what andyllm trains) is reproduced by a Llama tokenizer.json");
  ANDY_CHECK_T(ConfigError, !v.remove_extra_whitespaces,
               "tokenizer.json: the sentencepiece model removes extra whitespace, which a "
               "Llama tokenizer.json does not reproduce (andyllm trains with "
               "remove_extra_whitespaces off)");
  ANDY_CHECK_T(ConfigError, v.unk_id >= 0,
               "tokenizer.json: the sentencepiece model has no unk piece");
}

// The merges of transformers' SentencePieceExtractor (see the header), as (left id, right id).
std::vector<std::pair<int, int>> bpe_merges(const SpVocab& v) {
  std::unordered_map<std::string_view, int> id_of;
  for (size_t id = 0; id < v.pieces.size(); ++id)
    if (mergeable(v.pieces[id].type)) id_of.emplace(v.pieces[id].piece, static_cast<int>(id));
  struct Merge {
    int left, right, merged;
  };
  std::vector<Merge> merges;
  for (size_t id = 0; id < v.pieces.size(); ++id) {
    if (!mergeable(v.pieces[id].type)) continue;
    const std::string_view piece = v.pieces[id].piece;
    const size_t first = merges.size();
    for (size_t k = 1; k < piece.size(); ++k) {
      if ((static_cast<unsigned char>(piece[k]) & 0xC0) == 0x80)
        continue;  // inside a UTF-8 character
      const auto l = id_of.find(piece.substr(0, k)), r = id_of.find(piece.substr(k));
      if (l != id_of.end() && r != id_of.end())
        merges.push_back({l->second, r->second, static_cast<int>(id)});
    }
    std::sort(merges.begin() + first, merges.end(), [](const Merge& a, const Merge& b) {
      return std::pair(a.left, a.right) < std::pair(b.left, b.right);
    });
  }
  std::stable_sort(merges.begin(), merges.end(), [&](const Merge& a, const Merge& b) {
    return v.pieces[a.merged].score > v.pieces[b.merged].score;
  });
  std::vector<std::pair<int, int>> out;
  out.reserve(merges.size());
  for (const Merge& m : merges) out.emplace_back(m.left, m.right);
  return out;
}

ojson added_token(int id, const std::string& content, bool special) {
  return {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", special}};
}

ojson added_tokens(const SpVocab& v) {
  ojson out = ojson::array();
  for (size_t id = 0; id < v.pieces.size(); ++id) {
    const PieceType t = v.pieces[id].type;
    if (t == PieceType::kControl || t == PieceType::kUnknown || t == PieceType::kUserDefined)
      out.push_back(
          added_token(static_cast<int>(id), v.pieces[id].piece, t != PieceType::kUserDefined));
  }
  return out;
}

ojson normalizer(const SpVocab& v) {
  ojson seq = ojson::array();
  if (v.add_dummy_prefix) seq.push_back({{"type", "Prepend"}, {"prepend", kSpaceSymbol}});
  seq.push_back({{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kSpaceSymbol}});
  return {{"type", "Sequence"}, {"normalizers", seq}};
}

// LlamaTokenizerFast.update_post_processor with add_bos_token as given, add_eos_token false.
ojson post_processor(const SpVocab& v, bool add_bos_token) {
  auto special = [](const std::string& token, int type_id) {
    return ojson{{"SpecialToken", {{"id", token}, {"type_id", type_id}}}};
  };
  auto sequence = [](const char* id, int type_id) {
    return ojson{{"Sequence", {{"id", id}, {"type_id", type_id}}}};
  };
  ojson single = ojson::array(), pair = ojson::array(), specials = ojson::object();
  const std::string& bos = v.piece_of(v.bos_id);
  if (add_bos_token && v.bos_id >= 0) {
    single = {special(bos, 0), sequence("A", 0)};
    pair = {special(bos, 0), sequence("A", 0), special(bos, 1), sequence("B", 1)};
    specials[bos] = {{"id", bos}, {"ids", {v.bos_id}}, {"tokens", {bos}}};
  } else {
    single = {sequence("A", 0)};
    pair = {sequence("A", 0), sequence("B", 1)};
  }
  return {{"type", "TemplateProcessing"},
          {"single", single},
          {"pair", pair},
          {"special_tokens", specials}};
}

ojson decoder(const SpVocab& v) {
  ojson seq = {{{"type", "Replace"}, {"pattern", {{"String", kSpaceSymbol}}}, {"content", " "}},
               {{"type", "ByteFallback"}},
               {{"type", "Fuse"}}};
  if (v.add_dummy_prefix)
    seq.push_back({{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}});
  return {{"type", "Sequence"}, {"decoders", seq}};
}

ojson bpe_model(const SpVocab& v) {
  ojson vocab = ojson::object();
  for (size_t id = 0; id < v.pieces.size(); ++id) vocab[v.pieces[id].piece] = id;
  ojson merges = ojson::array();
  for (const auto& [l, r] : bpe_merges(v)) merges.push_back({v.pieces[l].piece, v.pieces[r].piece});
  return {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", v.piece_of(v.unk_id)},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", true},
          {"byte_fallback", v.byte_fallback},
          {"ignore_merges", false},
          {"vocab", vocab},
          {"merges", merges}};
}

// JSON text, UTF-8 unescaped; a piece that is not valid UTF-8 is a ConfigError.
template <typename Json>
std::string dump(const Json& j, const char* what) {
  try {
    return j.dump(2, ' ', /*ensure_ascii=*/false) + "\n";
  } catch (const nlohmann::json::exception& e) {
    ANDY_THROW(ConfigError, what, ": the sentencepiece model has a piece that is not valid UTF-8 (",
               e.what(), ")");
  }
}

// {"content": ..., "lstrip": false, ...} as transformers writes an AddedToken (sorted keys).
json token_entry(const std::string& content, bool special) {
  json e = {{"content", content},
            {"lstrip", false},
            {"normalized", false},
            {"rstrip", false},
            {"single_word", false}};
  if (special) e["special"] = true;
  return e;
}

// bos/eos/unk/pad: the piece, or null for a model without it.
json token_or_null(const SpVocab& v, int id) {
  return id >= 0 ? json(v.piece_of(id)) : json(nullptr);
}

std::string special_tokens_map_json(const SpVocab& v) {
  json m = json::object();
  const std::pair<const char*, int> tokens[] = {{"bos_token", v.bos_id},
                                                {"eos_token", v.eos_id},
                                                {"pad_token", v.pad_id},
                                                {"unk_token", v.unk_id}};
  for (const auto& [key, id] : tokens)
    if (id >= 0) m[key] = token_entry(v.piece_of(id), false);
  return dump(m, "special_tokens_map.json");
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::string bytes(std::istreambuf_iterator<char>(in), {});
  ANDY_CHECK_T(IoError, in.good() || in.eof(), "tokenizer ", path, ": cannot read it");
  return bytes;
}

}  // namespace

std::string hf_tokenizer_json(const SpVocab& v, bool add_bos_token) {
  check_exportable(v);
  ojson t = {{"version", "1.0"},
             {"truncation", nullptr},
             {"padding", nullptr},
             {"added_tokens", added_tokens(v)},
             {"normalizer", normalizer(v)},
             {"pre_tokenizer", nullptr},
             {"post_processor", post_processor(v, add_bos_token)},
             {"decoder", decoder(v)},
             {"model", bpe_model(v)}};
  return dump(t, "tokenizer.json");
}

std::string hf_tokenizer_config_json(const SpVocab& v, int model_max_length, bool add_bos_token) {
  ANDY_CHECK_T(ConfigError, model_max_length > 0, "tokenizer_config.json: model_max_length ",
               model_max_length, " must be positive");
  json decoder = json::object();
  for (size_t id = 0; id < v.pieces.size(); ++id) {
    const PieceType t = v.pieces[id].type;
    if (t == PieceType::kControl || t == PieceType::kUnknown || t == PieceType::kUserDefined)
      decoder[std::to_string(id)] = token_entry(v.pieces[id].piece, t != PieceType::kUserDefined);
  }
  json c = {{"tokenizer_class", "LlamaTokenizer"},
            {"add_bos_token", add_bos_token && v.bos_id >= 0},
            {"add_eos_token", false},
            {"added_tokens_decoder", decoder},
            {"bos_token", token_or_null(v, v.bos_id)},
            {"eos_token", token_or_null(v, v.eos_id)},
            {"unk_token", token_or_null(v, v.unk_id)},
            {"pad_token", token_or_null(v, v.pad_id)},
            {"model_max_length", model_max_length},
            {"clean_up_tokenization_spaces", false},
            {"legacy", true},
            {"sp_model_kwargs", json::object()},
            {"spaces_between_special_tokens", false},
            {"use_default_system_prompt", false}};
  // Written only when off: any add_prefix_space makes LlamaTokenizerFast rebuild tokenizer.json
  // from tokenizer.model (from_slow), which with it off is right and otherwise only slower.
  if (!v.add_dummy_prefix) c["add_prefix_space"] = false;
  return dump(c, "tokenizer_config.json");
}

void write_hf_tokenizer_files(const std::string& model_file, const std::string& out_dir,
                              int model_max_length, bool add_bos_token) {
  ANDY_CHECK_T(IoError, fs::is_directory(out_dir), "Hugging Face tokenizer files: ", out_dir,
               " is not a directory");
  const SpVocab v = read_sp_vocab(model_file);
  // Everything is built before anything is written: a model that cannot be exported leaves
  // out_dir as it was.
  const std::string model_bytes = read_bytes(model_file);
  const std::string tokenizer_json = hf_tokenizer_json(v, add_bos_token);
  const std::string config_json = hf_tokenizer_config_json(v, model_max_length, add_bos_token);
  const std::string special_json = special_tokens_map_json(v);
  const fs::path dir(out_dir);
  write_file_durable((dir / "tokenizer.model").string(), model_bytes);
  write_file_durable((dir / "tokenizer.json").string(), tokenizer_json);
  write_file_durable((dir / "tokenizer_config.json").string(), config_json);
  write_file_durable((dir / "special_tokens_map.json").string(), special_json);
}

}  // namespace andy::data
