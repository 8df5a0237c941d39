// Tokenizer: training through the dlopen'ed sentencepiece module in a LibTorch process,
// special ids, exact round trips (English, Chinese, emoji, whitespace), the vocabulary-size
// errors, and parity with Debian's Python sentencepiece on our tokenizer.model.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "core/base/error.h"
#include "data/checksum.h"
#include "data/tokenizer.h"
#include "tests/data/data_test_util.h"

using namespace andy;
using namespace andy::data;
using namespace andy::data::testing;

namespace {

// One tokenizer for the whole binary (training takes a fraction of a second).
class TokenizerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("andyllm-tok");
    train_test_tokenizer(dir_->path());
  }
  static void TearDownTestSuite() { delete dir_; }
  static TempDir* dir_;
};
TempDir* TokenizerTest::dir_ = nullptr;

}  // namespace

TEST_F(TokenizerTest, SpecialIdsAndVocab) {
  Tokenizer tok = Tokenizer::load(*dir_ / "tok.model");
  EXPECT_EQ(tok.vocab_size(), 600);
  EXPECT_EQ(tok.pad_id(), kPadId);
  EXPECT_EQ(tok.unk_id(), kUnkId);
  EXPECT_EQ(tok.bos_id(), kBosId);
  EXPECT_EQ(tok.eos_id(), kEosId);
  EXPECT_EQ(tok.id_to_piece(kEosId), "</s>");
  EXPECT_EQ(tok.checksum(), file_checksum(*dir_ / "tok.model"));
  EXPECT_EQ(tok.checksum().rfind("fnv1a64:", 0), 0u);
  EXPECT_TRUE(std::filesystem::exists(*dir_ / "tok.vocab"));
}

TEST_F(TokenizerTest, RoundTripIsExactForAnyValidText) {
  Tokenizer tok = Tokenizer::load(*dir_ / "tok.model");
  std::vector<std::string> texts = {
      "the quick brown fox",
      "这是一个简单的中文句子，用来测试分词器。",
      "混合 text with emoji 😀🚀👍🏽🇨🇳 and 数字 12345",
      "  leading spaces, inner  double spaces,\ttabs\nand\n\nnewlines  ",
      "unseen characters: Ωмир ∑ 鬱 🦄 — all via byte fallback",
      "",
  };
  for (const auto& t : texts) {
    auto ids = tok.encode(t);
    for (int id : ids) EXPECT_NE(id, tok.unk_id()) << t;
    EXPECT_EQ(tok.decode(ids), t);
  }
  // Chinese seen in training is covered by pieces (fewer tokens than characters), not bytes.
  auto zh = tok.encode("这是一个简单的中文句子，用来测试分词器。");  // 20 characters
  EXPECT_LT(zh.size(), 20u);
  for (int id : zh)
    EXPECT_NE(tok.id_to_piece(id).rfind("<0x", 0), 0u) << "byte piece for seen Chinese text";
}

TEST_F(TokenizerTest, WorksNextToLibTorchOps) {
  // The crash DEPENDENCIES.md describes happens when sentencepiece and LibTorch share a process.
  auto t = torch::randn({64, 64});
  Tokenizer tok = Tokenizer::load(*dir_ / "tok.model");
  auto ids = tok.encode("hello 你好");
  auto t2 = torch::matmul(t, t);
  EXPECT_EQ(tok.decode(ids), "hello 你好");
  EXPECT_EQ(t2.size(0), 64);
}

// Issue: one 50 MB line peaked at 4.5 GB in preprocess. Long texts are encoded in pieces of
// about 1 MiB; the pieces after the first without sentencepiece's dummy prefix, so the ids
// still decode to exactly the text (one line without newlines here: cut at spaces), and a text
// shorter than a piece is encoded as before.
TEST_F(TokenizerTest, LongTextsAreEncodedInPiecesAndStillRoundTrip) {
  Tokenizer tok = Tokenizer::load(*dir_ / "tok.model");
  std::string line;
  const char* words[] = {"alpha", "beta", "gamma", "δέλτα", "数据", "🙂", "epsilon"};
  for (size_t i = 0; line.size() < 3 * kEncodePieceBytes + 1000; ++i) line += std::string(words[(i * 7 + i / 3) % 7]) + " ";
  std::vector<int32_t> ids = tok.encode(line);
  EXPECT_EQ(tok.decode(ids), line);
  const std::string head = line.substr(0, 5000);
  std::vector<int32_t> head_ids = tok.encode(head);
  ASSERT_GE(ids.size(), head_ids.size());
  // The first piece is encoded exactly as a short text would be (up to its last token, which
  // may merge with what follows).
  EXPECT_TRUE(std::equal(head_ids.begin(), head_ids.end() - 1, ids.begin()));
}

TEST_F(TokenizerTest, VocabularyTooLargeForTheCorpus) {
  TokenizerTrainOptions o;
  o.input_files = {*dir_ / "corpus.txt"};
  o.model_prefix = *dir_ / "big";
  o.vocab_size = 50000;
  try {
    Tokenizer::train(o);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("--vocab_size 50000 is larger than this corpus can support"),
              std::string::npos)
        << m;
    EXPECT_NE(m.find("at most"), std::string::npos) << m;
  }
  o.vocab_size = 100;
  try {
    Tokenizer::train(o);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("--vocab_size 100 is too small"), std::string::npos)
        << e.what();
  }
}

TEST_F(TokenizerTest, MissingOrInvalidModelFile) {
  EXPECT_THROW(Tokenizer::load(*dir_ / "nope.model"), IoError);
  write_file(*dir_ / "junk.model", "this is not a protobuf");
  try {
    Tokenizer::load(*dir_ / "junk.model");
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("junk.model: not a readable sentencepiece model"),
              std::string::npos)
        << e.what();
  }
}

TEST_F(TokenizerTest, PythonSentencepieceGivesTheSameIds) {
  if (!python_has("sentencepiece"))
    GTEST_SKIP()
        << "/usr/bin/python3 has no sentencepiece module (apt install python3-sentencepiece)";
  Tokenizer tok = Tokenizer::load(*dir_ / "tok.model");
  std::vector<std::string> texts = {"the quick brown fox (12).", "机器学习需要大量的数据。",
                                    "混合 mixed 😀 🇨🇳 text\nline two", "unseen: Ωмир 🦄"};
  const auto python = python_sentencepiece_ids(*dir_ / "tok.model", texts, dir_->path());
  for (size_t i = 0; i < texts.size(); ++i) EXPECT_EQ(python[i], tok.encode(texts[i])) << "text: " << texts[i];
}
