// Hugging Face tokenizer files (data/hf_tokenizer.h) and the .model reader under them
// (data/sp_vocab.h): read_sp_vocab against what the sentencepiece module loads, broken model
// files, the four files written, and the independent check: Hugging Face's own JS reader of
// tokenizer.json (@huggingface/tokenizers, installed into build/formats-node by
// scripts/setup.sh; skipped without it) must give sentencepiece's ids on mixed Chinese, English,
// emoji, whitespace and byte-fallback texts (and so must Debian's Python sentencepiece).
#include <gtest/gtest.h>

#include <filesystem>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>
#include <set>

#include "core/base/error.h"
#include "data/hf_tokenizer.h"
#include "data/protobuf_wire.h"
#include "data/sp_vocab.h"
#include "data/tokenizer.h"
#include "tests/data/data_test_util.h"

using namespace andy;
using namespace andy::data;
using namespace andy::data::testing;
using json = nlohmann::json;
namespace wire = andy::data::wire;

namespace {

// One tokenizer for the whole binary, trained on the data tests' corpus (English, Chinese,
// emoji): 600 pieces, so rarer characters fall back to bytes.
class HfTokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("andyllm-hf-tok");
    train_test_tokenizer(dir_->path());
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string model() { return *dir_ / "tok.model"; }
  static TempDir* dir_;
};
TempDir* HfTokenizerTest::dir_ = nullptr;

std::string ids_text(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? " " : "") + std::to_string(ids[i]);
  return s + "]";
}

std::string pieces_text(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t id : ids) s += (s.empty() ? "" : " ") + tok.id_to_piece(id);
  return s;
}

bool is_byte_piece(const std::string& p) {
  return p.size() == 6 && p.rfind("<0x", 0) == 0 && p[5] == '>' &&
         std::isxdigit(static_cast<unsigned char>(p[3])) &&
         std::isxdigit(static_cast<unsigned char>(p[4]));
}

// Texts chosen to stress the tokenizer: mixed scripts, whitespace, byte fallback, the empty text.
const std::vector<std::string>& parity_texts() {
  static const std::vector<std::string> texts = {
      "Hello, 世界! 🤖 The quick brown fox — 你好吗？",
      "the quick brown fox jumps over the lazy dog",
      "这是一个简单的中文句子，用来测试分词器。",
      "   three leading spaces",
      "trailing spaces   ",
      "multiple   inner    spaces  and a   gap",
      " ",
      "line one\nline two\n\n\ttabbed\tand\r\nwindows\n",
      "\nstarts with a newline",
      "digits 0123456789, 3.14159 and 2024年12月31日",
      "鬱龘靐齉爩𠀋",  // rare CJK (one outside the BMP): byte fallback
      "👍🏽🇨🇳❤️🦄 emoji sequences",
      "naïve café Ωмир ∑",
      "a literal ▁ and ▁▁ in the text",
      "",
      corpus_doc(5),
      corpus_doc(7),
      corpus_doc(8),
  };
  return texts;
}

// n texts glued from random fragments (seeded: the same every run): words and phrases the model
// has merges for, runs of whitespace, newlines, tabs, a literal ▁, digits, unseen characters and
// emoji. No "<": a text holding a special piece's string ("<s>") is the known difference.
std::vector<std::string> random_texts(int n) {
  // clang-format off
  static const char* fragments[] = {
      "the ", "quick brown fox", " jumps", "over the lazy dog", "time is money", ", ", "!", "doc ",
      " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "▁", "0", "42", "3.14", "号",
      "我们今天去公园散步。", "中文和英文", "机器学习", "你好", "世界", "龘", "鬱", "é", "Ω",
      "😀", "🚀", "👍🏽", "🇨🇳", "❤️"};
  // clang-format on
  std::mt19937 rng(20240611);
  std::vector<std::string> texts;
  for (int i = 0; i < n; ++i) {
    std::string t;
    for (int k = std::uniform_int_distribution<int>(1, 24)(rng); k > 0; --k)
      t += fragments[std::uniform_int_distribution<size_t>(0, std::size(fragments) - 1)(rng)];
    texts.push_back(t);
  }
  return texts;
}

// What every reader must encode like sentencepiece: the texts above and 300 random ones.
const std::vector<std::string>& all_texts() {
  static const std::vector<std::string> texts = [] {
    std::vector<std::string> t = parity_texts(), r = random_texts(300);
    t.insert(t.end(), r.begin(), r.end());
    return t;
  }();
  return texts;
}

}  // namespace

TEST_F(HfTokenizerTest, ReadSpVocabSeesWhatSentencepieceLoads) {
  const SpVocab v = read_sp_vocab(model());
  const Tokenizer tok = Tokenizer::load(model());
  ASSERT_EQ(static_cast<int>(v.pieces.size()), tok.vocab_size());
  for (int id = 0; id < tok.vocab_size(); ++id)
    ASSERT_EQ(v.pieces[id].piece, tok.id_to_piece(id)) << "id " << id;
  EXPECT_EQ(v.pad_id, tok.pad_id());
  EXPECT_EQ(v.unk_id, tok.unk_id());
  EXPECT_EQ(v.bos_id, tok.bos_id());
  EXPECT_EQ(v.eos_id, tok.eos_id());
  EXPECT_EQ(v.pieces[kPadId].piece, "<pad>");
  EXPECT_EQ(v.pieces[kUnkId].piece, "<unk>");
  EXPECT_EQ(v.pieces[kBosId].piece, "<s>");
  EXPECT_EQ(v.pieces[kEosId].piece, "</s>");
  EXPECT_EQ(v.pieces[kPadId].type, PieceType::kControl);
  EXPECT_EQ(v.pieces[kUnkId].type, PieceType::kUnknown);
  EXPECT_EQ(v.pieces[kBosId].type, PieceType::kControl);
  EXPECT_EQ(v.pieces[kEosId].type, PieceType::kControl);
  EXPECT_EQ(v.model_type, "bpe");
  EXPECT_TRUE(v.byte_fallback);
  EXPECT_TRUE(v.add_dummy_prefix);
  EXPECT_FALSE(v.remove_extra_whitespaces);
  EXPECT_EQ(v.normalizer_name, "identity");
  // Every <0xNN> is a BYTE piece and nothing else is; the rest are normal pieces whose scores
  // fall with the id (what ordering merges by score or by id relies on).
  int bytes = 0;
  float last_score = 1;
  for (int id = 4; id < tok.vocab_size(); ++id) {
    const SpPiece& p = v.pieces[id];
    EXPECT_EQ(p.type == PieceType::kByte, is_byte_piece(p.piece)) << "id " << id << " " << p.piece;
    if (p.type == PieceType::kByte) {
      ++bytes;
      continue;
    }
    EXPECT_EQ(p.type, PieceType::kNormal) << "id " << id << " " << p.piece;
    EXPECT_LT(p.score, last_score) << "id " << id << " " << p.piece;
    last_score = p.score;
  }
  EXPECT_EQ(bytes, 256);
}

TEST_F(HfTokenizerTest, BrokenModelFilesAreIoErrorsNamingTheFile) {
  const std::string missing = *dir_ / "missing.model";
  EXPECT_THROW(read_sp_vocab(missing), IoError);
  EXPECT_NE(error_of([&] { read_sp_vocab(missing); }).find(missing), std::string::npos);

  const std::string bytes = read_text(model());
  std::vector<std::pair<std::string, std::string>> cases = {
      {"garbage.model", "this is not a protobuf"},
      {"empty.model", ""},
      {"one_byte.model", bytes.substr(0, 1)}};
  for (size_t cut : {size_t{7}, bytes.size() / 3, bytes.size() / 2, bytes.size() * 9 / 10})
    cases.emplace_back("cut_at_" + std::to_string(cut) + ".model", bytes.substr(0, cut));
  // Cut exactly where the pieces end: every field is whole, but the specs are missing.
  size_t pieces_end = 0;
  for (wire::Field f; pieces_end < bytes.size();) {
    size_t next = pieces_end;
    ASSERT_TRUE(wire::next_field(bytes, next, f));
    if (f.number() != 1) break;
    pieces_end = next;
  }
  cases.emplace_back("only_pieces.model", bytes.substr(0, pieces_end));
  for (const auto& [name, content] : cases) {
    const std::string path = *dir_ / name;
    write_file(path, content);
    try {
      read_sp_vocab(path);
      ADD_FAILURE() << name << ": expected IoError";
    } catch (const IoError& e) {
      EXPECT_NE(std::string(e.what()).find(path + ": not a readable sentencepiece model"),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_NE(error_of([&] { read_sp_vocab(*dir_ / "only_pieces.model"); }).find("no trainer spec"),
            std::string::npos);
}

TEST_F(HfTokenizerTest, WritesTheFourFiles) {
  TempDir out("andyllm-hf-out");
  write_hf_tokenizer_files(model(), out.path(), 2048);
  std::set<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(out.path()))
    names.insert(e.path().filename().string());
  EXPECT_EQ(names, (std::set<std::string>{"special_tokens_map.json", "tokenizer.json",
                                          "tokenizer.model", "tokenizer_config.json"}));
  EXPECT_EQ(read_text(out / "tokenizer.model"), read_text(model()));

  const json config = json::parse(read_text(out / "tokenizer_config.json"));
  EXPECT_EQ(config["tokenizer_class"], "LlamaTokenizer");
  EXPECT_EQ(config["add_bos_token"], false) << "models trained here never see bos in front of a text";
  EXPECT_EQ(config["add_eos_token"], false);
  EXPECT_EQ(config["bos_token"], "<s>");
  EXPECT_EQ(config["eos_token"], "</s>");
  EXPECT_EQ(config["unk_token"], "<unk>");
  EXPECT_EQ(config["pad_token"], "<pad>");
  EXPECT_EQ(config["model_max_length"], 2048);
  EXPECT_EQ(config["legacy"], true);
  EXPECT_EQ(config["clean_up_tokenization_spaces"], false);
  EXPECT_FALSE(config.contains("add_prefix_space"))
      << "it would make LlamaTokenizerFast rebuild tokenizer.json";
  const std::pair<int, const char*> specials[] = {
      {kPadId, "<pad>"}, {kUnkId, "<unk>"}, {kBosId, "<s>"}, {kEosId, "</s>"}};
  for (const auto& [id, piece] : specials) {
    const json& t = config["added_tokens_decoder"][std::to_string(id)];
    EXPECT_EQ(t["content"], piece);
    EXPECT_EQ(t["special"], true);
    EXPECT_EQ(t["normalized"], false);
  }
  EXPECT_EQ(config["added_tokens_decoder"].size(), 4u);

  const json map = json::parse(read_text(out / "special_tokens_map.json"));
  EXPECT_EQ(map["bos_token"]["content"], "<s>");
  EXPECT_EQ(map["eos_token"]["content"], "</s>");
  EXPECT_EQ(map["unk_token"]["content"], "<unk>");
  EXPECT_EQ(map["pad_token"]["content"], "<pad>");

  // tokenizer.json: the vocabulary by id, the special tokens, and merges of two vocabulary
  // pieces into a third, never of byte or control pieces, best (lowest id) merged piece first.
  const SpVocab v = read_sp_vocab(model());
  const json t = json::parse(read_text(out / "tokenizer.json"));
  EXPECT_EQ(t, json::parse(hf_tokenizer_json(v)));
  const json& m = t["model"];
  EXPECT_EQ(m["type"], "BPE");
  EXPECT_EQ(m["unk_token"], "<unk>");
  EXPECT_EQ(m["byte_fallback"], true);
  EXPECT_EQ(m["fuse_unk"], true);
  ASSERT_EQ(m["vocab"].size(), v.pieces.size());
  for (size_t id = 0; id < v.pieces.size(); ++id)
    ASSERT_EQ(m["vocab"].at(v.pieces[id].piece), id) << v.pieces[id].piece;
  ASSERT_GT(m["merges"].size(), 100u);
  int last_merged = -1;
  for (const json& pair : m["merges"]) {
    ASSERT_TRUE(pair.is_array() && pair.size() == 2) << pair.dump();
    const std::string l = pair[0], r = pair[1];
    ASSERT_TRUE(m["vocab"].contains(l + r)) << pair.dump();
    const int merged = m["vocab"].at(l + r), left = m["vocab"].at(l), right = m["vocab"].at(r);
    for (int id : {merged, left, right})
      EXPECT_EQ(v.pieces[id].type, PieceType::kNormal) << pair.dump();
    EXPECT_GE(merged, last_merged) << pair.dump();
    last_merged = merged;
  }
  ASSERT_EQ(t["added_tokens"].size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(t["added_tokens"][i]["id"], i);
    EXPECT_EQ(t["added_tokens"][i]["content"], v.pieces[i].piece);
    EXPECT_EQ(t["added_tokens"][i]["special"], true);
  }
  EXPECT_EQ(t["post_processor"]["single"], json::parse(R"([{"Sequence": {"id": "A", "type_id": 0}}])"))
      << "no bos in front: models trained here never see one";
  EXPECT_EQ(t["normalizer"]["normalizers"][0]["type"], "Prepend");

  EXPECT_THROW(write_hf_tokenizer_files(model(), out / "no_such_dir", 2048), IoError);
  EXPECT_THROW(write_hf_tokenizer_files(*dir_ / "missing.model", out.path(), 2048), IoError);
}

TEST_F(HfTokenizerTest, ModelsALlamaTokenizerJsonCannotReproduceAreRefused) {
  const SpVocab good = read_sp_vocab(model());
  SpVocab v = good;
  v.model_type = "unigram";
  EXPECT_THROW(hf_tokenizer_json(v), ConfigError);
  v = good;
  v.normalizer_name = "nmt_nfkc";
  EXPECT_THROW(hf_tokenizer_json(v), ConfigError);
  v = good;
  v.remove_extra_whitespaces = true;
  EXPECT_THROW(hf_tokenizer_json(v), ConfigError);
  v = good;
  v.pieces[10].piece = "\xff\xfe";
  EXPECT_THROW(hf_tokenizer_json(v), ConfigError);
  // Without the dummy prefix: no Prepend normalizer, no Strip decoder.
  v = good;
  v.add_dummy_prefix = false;
  const json t = json::parse(hf_tokenizer_json(v));
  ASSERT_EQ(t["normalizer"]["normalizers"].size(), 1u);
  EXPECT_EQ(t["normalizer"]["normalizers"][0]["type"], "Replace");
  for (const json& d : t["decoder"]["decoders"]) EXPECT_NE(d["type"], "Strip");
  EXPECT_EQ(json::parse(hf_tokenizer_config_json(v, 16))["add_prefix_space"], false);
  // With add_bos_token: bos in front, and the config says so.
  v = good;
  const json with_bos = json::parse(hf_tokenizer_json(v, true))["post_processor"];
  EXPECT_EQ(with_bos["single"],
            json::parse(R"([{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}])"));
  EXPECT_EQ(json::parse(hf_tokenizer_config_json(v, 16, true))["add_bos_token"], true);
  // Without bos: nothing added in front even when asked, and the config says so.
  v = good;
  v.bos_id = -1;
  const json no_bos = json::parse(hf_tokenizer_json(v, true))["post_processor"];
  EXPECT_EQ(no_bos["single"], json::parse(R"([{"Sequence": {"id": "A", "type_id": 0}}])"));
  EXPECT_EQ(no_bos["special_tokens"], json::object());
  const json config = json::parse(hf_tokenizer_config_json(v, 16, true));
  EXPECT_EQ(config["add_bos_token"], false);
  EXPECT_TRUE(config["bos_token"].is_null());
}

// The independent check: Hugging Face's JS reader of our tokenizer.json gives sentencepiece's
// ids (with bos in front when special tokens are added and the export asks for it), and decodes
// them as sentencepiece does.
TEST_F(HfTokenizerTest, HuggingFaceJsReaderEncodesLikeSentencepiece) {
  namespace fs = std::filesystem;
  const std::string source = env_or_empty("ANDYLLM_SOURCE_DIR").empty()
                                 ? ANDYLLM_TEST_SOURCE_DIR
                                 : env_or_empty("ANDYLLM_SOURCE_DIR");
  const std::string node_dir = env_or_empty("ANDYLLM_FORMATS_NODE").empty()
                                   ? source + "/build/formats-node"
                                   : env_or_empty("ANDYLLM_FORMATS_NODE");
  if (!fs::exists(node_dir + "/node_modules/@huggingface/tokenizers/package.json"))
    GTEST_SKIP() << "@huggingface/tokenizers is not installed in " << node_dir
                 << " (scripts/setup.sh installs it)";
  if (shell("node --version").first != 0)
    GTEST_SKIP() << "no node on PATH (scripts/setup.sh installs nodejs)";

  const Tokenizer tok = Tokenizer::load(model());
  TempDir out("andyllm-hf-js");
  write_hf_tokenizer_files(model(), out.path(), 4096, /*add_bos_token=*/true);
  const std::vector<std::string>& texts = all_texts();
  write_file(out / "texts.json", json(texts).dump());
  const auto [rc, err] = shell("ANDYLLM_FORMATS_NODE='" + node_dir + "' node '" + source +
                               "/tests/formats/node/tokenize.mjs' '" + out.path() + "' '" +
                               (out / "texts.json") + "' > '" + (out / "js.json") + "'");
  ASSERT_EQ(rc, 0) << err;
  const json results = json::parse(read_text(out / "js.json"))["results"];
  ASSERT_EQ(results.size(), texts.size());

  int byte_fallback_texts = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string& text = texts[i];
    const std::vector<int32_t> ours = tok.encode(text);
    const auto js = results[i]["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(js, ours) << "text: \"" << text << "\"\n  sentencepiece: " << ids_text(ours) << "  "
                        << pieces_text(tok, ours) << "\n  @huggingface/tokenizers: " << ids_text(js)
                        << "  " << results[i]["tokens"].dump();
    std::vector<int32_t> with_bos = {tok.bos_id()};
    with_bos.insert(with_bos.end(), ours.begin(), ours.end());
    EXPECT_EQ(results[i]["ids_with_special"].get<std::vector<int32_t>>(), with_bos)
        << "text: \"" << text << "\"";
    // Decoding: as sentencepiece decodes (which is the text itself unless it held a literal ▁).
    const std::string sp_decoded = tok.decode(ours);
    EXPECT_EQ(results[i]["decoded"], sp_decoded) << "text: \"" << text << "\"";
    EXPECT_EQ(results[i]["decoded_skip_special"], sp_decoded) << "text: \"" << text << "\"";
    if (text.find("\xe2\x96\x81") == std::string::npos) {
      EXPECT_EQ(sp_decoded, text);
    }
    for (int32_t id : ours)
      if (is_byte_piece(tok.id_to_piece(id))) {
        ++byte_fallback_texts;
        break;
      }
  }
  EXPECT_GE(byte_fallback_texts, 3) << "the texts should exercise byte fallback";
}

// The same texts through Debian's Python sentencepiece: the ids the JS reader is held to are
// sentencepiece's own, not an artefact of our module.
TEST_F(HfTokenizerTest, PythonSentencepieceAgreesOnTheSameTexts) {
  if (!python_has("sentencepiece"))
    GTEST_SKIP()
        << "/usr/bin/python3 has no sentencepiece module (apt install python3-sentencepiece)";
  const Tokenizer tok = Tokenizer::load(model());
  const std::vector<std::string>& texts = all_texts();
  const auto python = python_sentencepiece_ids(model(), texts, dir_->path());
  for (size_t i = 0; i < texts.size(); ++i)
    EXPECT_EQ(python[i], tok.encode(texts[i])) << "text: \"" << texts[i] << "\"";
}
