// Tokenizer: training through the dlopen'ed sentencepiece module in a LibTorch process,
// special ids, exact round trips (English, Chinese, emoji, whitespace), the vocabulary-size
// errors, and parity with Debian's Python sentencepiece on our tokenizer.model.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <random>

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

namespace {

// Texts for the word cache: runs of spaces anywhere (leading, trailing, inside), tabs and
// newlines, the "▁" character itself, Chinese, emoji and characters outside the vocabulary
// (byte fallback), digits, combining and non-ASCII spaces, words longer than the cache takes,
// and the same words many times (cache hits); then random strings of such parts.
std::vector<std::string> word_cache_texts() {
  std::vector<std::string> texts = {
      "",
      " ",
      "  ",
      "a",
      " a",
      "  a",
      "a ",
      "a  ",
      "the quick  brown   fox ",
      "  the the  the   the",
      "\tthe\n the \n\nthe",
      "▁the ▁▁the the▁ ▁",
      "机器 学习  需要 数据。",
      "😀 😀  🦄🦄 Ωмир",
      "12345 678 9",
      std::string(200, 'x') + " " + std::string(100, 'y') + "  " + std::string(200, 'x'),
      "  a b  a",
      "e\u0301 \u00a0the\u3000 the"};
  std::mt19937 rng(7);
  const std::vector<std::string> parts = {
      " ",  " ",  " ", " ", "the", "a", "b", "quick", "fox",    "\n",     "\t",    "▁",
      "中", "文", "😀", "Ω", "1",   "2", ".", ",",     "\u0301", "\u00a0", "\u3000"};
  for (int i = 0; i < 600; ++i) {
    std::string t;
    for (int k = 0, n = static_cast<int>(rng() % 24); k < n; ++k) t += parts[rng() % parts.size()];
    texts.push_back(t);
  }
  return texts;
}

Tokenizer load_without_word_cache(const std::string& model) {
  setenv("ANDYLLM_TOKENIZER_WORD_CACHE", "0", 1);
  Tokenizer t = Tokenizer::load(model);
  unsetenv("ANDYLLM_TOKENIZER_WORD_CACHE");
  return t;
}

}  // namespace

// Our tokenizers keep every space (remove_extra_whitespaces off, whitespace-only pieces): words
// take the spaces before them and are encoded as continuations. Word by word, through the
// cache (twice: the second time from it), the ids are those of the whole text. Also with a
// model trained on indented text, which has pieces of several spaces ("▁▁▁▁"): a run of spaces
// may then merge either way, so a word must take all of the spaces before it.
TEST_F(TokenizerTest, WordCacheGivesTheIdsOfWholeTexts) {
  std::string code;
  for (int i = 0; i < 400; ++i)
    code += "def f" + std::to_string(i) + "(x):\n    if x  >  " + std::to_string(i % 7) +
            ":\n        return  x\n" + std::string(i % 9, ' ') + "the  quick   fox\n";
  write_file(*dir_ / "code.txt", code);
  TokenizerTrainOptions o;
  o.input_files = {*dir_ / "code.txt", *dir_ / "corpus.txt"};
  o.model_prefix = *dir_ / "code";
  o.vocab_size = 600;
  Tokenizer::train(o);
  for (const std::string& model : {*dir_ / "tok.model", *dir_ / "code.model"}) {
    Tokenizer cached = Tokenizer::load(model);
    Tokenizer whole = load_without_word_cache(model);
    ASSERT_TRUE(cached.word_cache());
    ASSERT_FALSE(whole.word_cache());
    if (model == *dir_ / "code.model") {
      bool runs = false;
      for (int id = 0; id < cached.vocab_size(); ++id)
        runs = runs || cached.id_to_piece(id) == "▁▁▁▁";
      ASSERT_TRUE(runs) << "expected a piece of four spaces in " << model;
    }
    const auto texts = word_cache_texts();
    for (int round = 0; round < 2; ++round) {
      for (const auto& t : texts) {
        const auto ids = cached.encode(t);
        ASSERT_EQ(ids, whole.encode(t)) << "round " << round << ", text: [" << t << "]";
        if (t.find("▁") == std::string::npos) {
          ASSERT_EQ(cached.decode(ids), t);  // "▁" decodes to " "
        }
      }
    }
  }
}

// Sentencepiece's defaults (nmt_nfkc normalization, extra whitespace removed, a dummy prefix):
// each word with its spaces is encoded alone, and the ids are what Debian's Python
// sentencepiece gives for the whole text. A unigram model, or one with pieces across spaces, is
// not split at all.
TEST_F(TokenizerTest, WordCacheOnSentencepieceDefaultsMatchesPython) {
  if (!python_has("sentencepiece"))
    GTEST_SKIP()
        << "/usr/bin/python3 has no sentencepiece module (apt install python3-sentencepiece)";
  const std::string dir = dir_->path();
  auto [rc, out] = shell("cd " + dir +
                         " && /usr/bin/python3 -c \"import sentencepiece as spm\n"
                         "for t in ('bpe', 'unigram'):\n"
                         "    spm.SentencePieceTrainer.train(input='corpus.txt', "
                         "model_prefix='default_' + t, model_type=t,"
                         " vocab_size=400, byte_fallback=True)\n"
                         "spm.SentencePieceTrainer.train(input='corpus.txt', model_prefix='across_spaces',"
                         " model_type='bpe', vocab_size=400, byte_fallback=True, split_by_whitespace=False)\"");
  ASSERT_EQ(rc, 0) << out;
  Tokenizer bpe = Tokenizer::load(dir + "/default_bpe.model");
  EXPECT_TRUE(bpe.word_cache());
  EXPECT_FALSE(Tokenizer::load(dir + "/default_unigram.model").word_cache());
  // Pieces across spaces ("▁of▁the"): not split.
  Tokenizer across = Tokenizer::load(dir + "/across_spaces.model");
  bool spans = false;
  for (int id = 0; id < across.vocab_size(); ++id)
    spans = spans || across.id_to_piece(id).find("▁", 1) != std::string::npos;
  EXPECT_TRUE(spans);
  EXPECT_FALSE(across.word_cache());
  const auto texts = word_cache_texts();
  const auto python = python_sentencepiece_ids(dir + "/default_bpe.model", texts, dir);
  for (int round = 0; round < 2; ++round)
    for (size_t i = 0; i < texts.size(); ++i)
      ASSERT_EQ(bpe.encode(texts[i]), python[i])
          << "round " << round << ", text: [" << texts[i] << "]";
}
