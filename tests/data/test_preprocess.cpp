// Preprocessing end to end in one process: round trip of every document through the shards
// (English, Chinese, emoji; after the documented normalization), a disjoint covering
// train/validation split, manifest and shard attributes, independent readers (h5dump, h5py),
// rerun/overwrite rules, every bad-input message, and the andyllm CLI.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

#include "core/base/error.h"
#include "data/checksum.h"
#include "data/loader.h"
#include "data/preprocess.h"
#include "data/text_input.h"
#include "tests/data/data_test_util.h"

using andy::data::testing::error_of;

using namespace andy;
using namespace andy::data;
using namespace andy::data::testing;

namespace {

// A corpus of .txt (blank-line separated documents, CRLF, outer whitespace) and .jsonl files.
// Returns the expected documents after normalization.
std::vector<std::string> make_corpus(const std::string& dir, int n_docs = 90) {
  std::vector<std::string> expected;
  std::string txt_a, txt_b, jsonl;
  for (int i = 0; i < n_docs; ++i) {
    std::string d = corpus_doc(i);
    expected.push_back(normalize_document(d));
    if (i % 3 == 0) {
      txt_a += "  " + d + "  \n\n\n";
    } else if (i % 3 == 1) {
      std::string crlf;
      for (char c : d) crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
      txt_b += crlf + "\r\n\r\n";
    } else {
      jsonl += nlohmann::json{{"text", d}, {"id", i}}.dump() + "\n";
    }
  }
  write_file(dir + "/en/a.txt", txt_a);
  write_file(dir + "/zh/b.txt", txt_b);
  write_file(dir + "/mixed.jsonl", jsonl);
  return expected;
}

PreprocessOptions base_options(const std::string& in, const std::string& out) {
  PreprocessOptions o;
  o.input_dir = in;
  o.output_dir = out;
  o.vocab_size = 600;
  o.val_fraction = 0.2;
  o.shard_tokens = 700;
  o.read.txt_mode = TxtMode::kBlankLines;
  o.threads = 2;
  return o;
}

std::vector<int64_t> parse_ints(const std::string& s) {
  std::vector<int64_t> v;
  size_t i = 0;
  while (i < s.size()) {
    if (isdigit(static_cast<unsigned char>(s[i]))) {
      size_t j = i;
      while (j < s.size() && isdigit(static_cast<unsigned char>(s[j]))) ++j;
      v.push_back(std::stoll(s.substr(i, j - i)));
      i = j;
    } else {
      ++i;
    }
  }
  return v;
}

// One preprocessed dataset shared by the read-only tests.
class Preprocessed : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir("andyllm-pre");
    expected_ = new std::vector<std::string>(make_corpus(*dir_ / "raw"));
    result_ = new PreprocessResult(run_preprocess(base_options(*dir_ / "raw", *dir_ / "out")));
  }
  static void TearDownTestSuite() {
    delete result_;
    delete expected_;
    delete dir_;
  }
  static TempDir* dir_;
  static std::vector<std::string>* expected_;
  static PreprocessResult* result_;
};
TempDir* Preprocessed::dir_ = nullptr;
std::vector<std::string>* Preprocessed::expected_ = nullptr;
PreprocessResult* Preprocessed::result_ = nullptr;

}  // namespace

TEST_F(Preprocessed, EveryDocumentRoundTripsAndTheSplitIsDisjointAndCovering) {
  Tokenizer tok = Tokenizer::load(*dir_ / "out/tokenizer.model");
  auto train = decode_split(*dir_ / "out/train", tok);
  auto val = decode_split(*dir_ / "out/validation", tok);
  std::multiset<std::string> want(expected_->begin(), expected_->end());
  std::multiset<std::string> got(train.begin(), train.end());
  got.insert(val.begin(), val.end());
  EXPECT_EQ(got, want);
  std::set<std::string> train_set(train.begin(), train.end());
  for (const auto& v : val) EXPECT_EQ(train_set.count(v), 0u) << "in both splits: " << v;
  EXPECT_EQ(val.size(), 18u);  // round(90 * 0.2)
  EXPECT_EQ(train.size(), 72u);
  EXPECT_EQ(result_->documents, 90);
  EXPECT_EQ(result_->train_documents, 72);
  EXPECT_EQ(result_->validation_documents, 18);
  EXPECT_GT(result_->train_shards, 1);  // shard_tokens 700 forces several
  // Chinese and emoji documents are among them, byte for byte.
  int zh = 0, emoji = 0;
  for (const auto& d : got) {
    zh += d.find("中文") != std::string::npos;
    emoji += d.find("🇨🇳") != std::string::npos;
  }
  EXPECT_GT(zh, 0);
  EXPECT_GT(emoji, 0);
}

TEST_F(Preprocessed, ManifestAndShardAttributesAgree) {
  auto m = nlohmann::json::parse(read_text(*dir_ / "out/manifest.json"));
  Tokenizer tok = Tokenizer::load(*dir_ / "out/tokenizer.model");
  EXPECT_EQ(m["format_version"], 2);
  EXPECT_EQ(m["vocab_size"], 600);
  EXPECT_EQ(m["tokenizer_checksum"], tok.checksum());
  // The checksum is standard FNV-1a 64: an independent computation in Python agrees.
  auto [rc, py] = shell("/usr/bin/python3 -c \"import sys; h=14695981039346656037\n"
                        "for b in open(sys.argv[1],'rb').read(): h=((h^b)*1099511628211)%(1<<64)\n"
                        "print('fnv1a64:%016x'%h)\" " + *dir_ / "out/tokenizer.model");
  EXPECT_EQ(rc, 0) << py;
  EXPECT_EQ(py, tok.checksum() + "\n");
  EXPECT_EQ(m["token_dtype"], "uint16");
  EXPECT_EQ(m["special_ids"]["eos"], 3);
  EXPECT_EQ(m["special_ids"]["pad"], 0);
  int64_t tokens = 0, docs = 0;
  for (const char* split : {"train", "validation"}) {
    int64_t split_tokens = 0;
    for (const auto& s : m["splits"][split]["shards"]) {
      std::string path = *dir_ / ("out/" + s["file"].get<std::string>());
      EXPECT_EQ(s["checksum"], file_checksum(path));
      ShardReader r(path);
      EXPECT_EQ(r.info().vocab_size, 600);
      EXPECT_EQ(r.info().tokenizer_checksum, tok.checksum());
      EXPECT_EQ(r.info().token_count, s["tokens"].get<int64_t>());
      EXPECT_EQ(r.info().document_count, s["documents"].get<int64_t>());
      EXPECT_EQ(r.info().token_bytes, 2);
      EXPECT_EQ(r.info().split, split);
      EXPECT_LE(r.info().token_count, 700 + 200);  // one document may start a shard past the limit
      split_tokens += r.info().token_count;
      docs += r.info().document_count;
    }
    EXPECT_EQ(m["splits"][split]["tokens"].get<int64_t>(), split_tokens);
    tokens += split_tokens;
  }
  EXPECT_EQ(docs, 90);
  EXPECT_EQ(tokens, result_->train_tokens + result_->validation_tokens);
  EXPECT_FALSE(std::filesystem::exists(*dir_ / "out/.preprocess-tmp"));
  EXPECT_TRUE(std::filesystem::exists(*dir_ / "out/tokenizer.vocab"));
  for (const auto& e : std::filesystem::recursive_directory_iterator(*dir_ / "out"))
    EXPECT_NE(e.path().extension(), ".tmp") << e.path();
}

TEST_F(Preprocessed, TheLoaderAcceptsItWithTheRunsTokenizer) {
  Tokenizer tok = Tokenizer::load(*dir_ / "out/tokenizer.model");
  LoaderOptions o;
  o.split = *dir_ / "out/train";
  o.seq_len = 16;
  o.batch_size = 2;
  o.expected_vocab_size = tok.vocab_size();
  o.tokenizer_checksum = tok.checksum();
  o.verify_checksums = true;
  DataLoader l(o);
  EXPECT_EQ(l.total_tokens(), result_->train_tokens);
  Batch b = l.next_batch();
  EXPECT_EQ(b.input.sizes(), (std::vector<int64_t>{2, 16}));
  EXPECT_LT(b.input.max().item<int64_t>(), 600);
}

TEST_F(Preprocessed, H5dumpAndH5pyReadTheSameTokens) {
  std::string shard = *dir_ / "out/train/shard-00000-00000.h5";
  auto ours = ShardReader(shard).read_all();
  auto [rc, out] = shell("h5dump -d /tokens -y -w 0 " + shard);
  if (rc == 127) GTEST_SKIP() << "h5dump not installed (apt install hdf5-tools)";
  ASSERT_EQ(rc, 0) << out;
  size_t data = out.find("DATA {");
  ASSERT_NE(data, std::string::npos) << out;
  auto dumped = parse_ints(out.substr(data + 6, out.find('}', data) - data - 6));
  EXPECT_EQ(dumped, ours);
  auto [rc2, attrs] = shell("h5dump -a /vocab_size " + shard);
  EXPECT_NE(attrs.find("600"), std::string::npos) << attrs;

  if (!python_has("h5py"))
    GTEST_SKIP() << "/usr/bin/python3 has no h5py (apt install python3-h5py)";
  auto [rc3, py] = shell(
      "/usr/bin/python3 -c \"import h5py,sys; f=h5py.File(sys.argv[1],'r'); t=f['tokens']; "
      "print(t.dtype, f.attrs['token_count'], f['doc_offsets'][-1]); print(' '.join(map(str, "
      "t[:])))\" " +
      shard);
  ASSERT_EQ(rc3, 0) << py;
  size_t nl = py.find('\n');
  std::string header = py.substr(0, nl);
  EXPECT_EQ(header, "uint16 " + std::to_string(ours.size()) + " " + std::to_string(ours.size()));
  EXPECT_EQ(parse_ints(py.substr(nl + 1)), ours);
}

TEST_F(Preprocessed, RerunRefusesWithoutOverwriteAndReusesAGivenTokenizer) {
  auto o = base_options(*dir_ / "raw", *dir_ / "out");
  std::string m = error_of([&] { run_preprocess(o); });
  EXPECT_NE(m.find("already exists and is not empty (it holds a dataset): refusing to overwrite "
                   "it; pass --overwrite"),
            std::string::npos)
      << m;
  EXPECT_TRUE(std::filesystem::exists(*dir_ / "out/manifest.json"));  // untouched

  // A second dataset with the first one's tokenizer: identical tokens, same checksum.
  auto o2 = base_options(*dir_ / "raw", *dir_ / "out2");
  o2.tokenizer_path = *dir_ / "out/tokenizer.model";
  o2.vocab_size = 0;
  auto r2 = run_preprocess(o2);
  EXPECT_EQ(r2.tokenizer_checksum, result_->tokenizer_checksum);
  EXPECT_EQ(r2.train_tokens, result_->train_tokens);
  EXPECT_EQ(r2.validation_documents, result_->validation_documents);
  EXPECT_EQ(ShardReader(*dir_ / "out2/train/shard-00000-00000.h5").read_all(),
            ShardReader(*dir_ / "out/train/shard-00000-00000.h5").read_all());
  // --overwrite replaces it (and keeps the tokenizer it was given, even inside the directory).
  o2.overwrite = true;
  o2.tokenizer_path = *dir_ / "out2/tokenizer.model";
  o2.val_fraction = 0.5;
  auto r3 = run_preprocess(o2);
  EXPECT_EQ(r3.validation_documents, 45);
  EXPECT_EQ(r3.tokenizer_checksum, result_->tokenizer_checksum);
  o2.vocab_size = 1000;
  m = error_of([&] { run_preprocess(o2); });
  EXPECT_NE(m.find("--vocab_size 1000 differs from the vocabulary of --tokenizer_path"),
            std::string::npos)
      << m;
}

// The tokenize step runs as a pipeline (the other threads encode a batch of 512 documents
// while the first writes the one before and reads the next): 1,300 documents in three files
// make three batches that span files, and every thread count writes the same shards.
TEST(PreprocessThreads, OneTwoAndThreeThreadsWriteTheSameShards) {
  TempDir dir;
  make_corpus(dir / "raw", 1300);
  auto o = base_options(dir / "raw", dir / "t1");
  o.shard_tokens = 20000;
  o.threads = 1;
  const PreprocessResult r1 = run_preprocess(o);
  EXPECT_EQ(r1.documents, 1300);
  auto files = [](const std::string& d) {
    std::vector<std::string> v;
    for (const char* split : {"train", "validation"})
      for (const auto& e : std::filesystem::directory_iterator(d + "/" + split))
        v.push_back(std::string(split) + "/" + e.path().filename().string());
    std::sort(v.begin(), v.end());
    return v;
  };
  const std::vector<std::string> want = files(dir / "t1");
  EXPECT_GT(want.size(), 2u);
  for (int threads : {2, 3}) {
    const std::string out = dir / ("t" + std::to_string(threads));
    o.output_dir = out;
    o.threads = threads;
    o.tokenizer_path = dir / "t1/tokenizer.model";
    o.vocab_size = 0;
    const PreprocessResult r = run_preprocess(o);
    EXPECT_EQ(r.train_tokens, r1.train_tokens) << threads << " threads";
    EXPECT_EQ(r.validation_tokens, r1.validation_tokens) << threads << " threads";
    ASSERT_EQ(files(out), want) << threads << " threads";
    for (const std::string& f : want)
      EXPECT_EQ(ShardReader(out + "/" + f).read_all(), ShardReader(dir / "t1/" + f).read_all())
          << f << ", " << threads << " threads";
  }
}

TEST(PreprocessErrors, MissingEmptyAndUnreadableInput) {
  TempDir dir;
  std::string m = error_of([&] { run_preprocess(base_options(dir / "none", dir / "out")); });
  EXPECT_NE(m.find("--input_dir " + (dir / "none") + ": no such directory"), std::string::npos)
      << m;
  std::filesystem::create_directories(dir / "empty");
  m = error_of([&] { run_preprocess(base_options(dir / "empty", dir / "out")); });
  EXPECT_NE(m.find("no .txt or .jsonl files found"), std::string::npos) << m;
  write_file(dir / "blank/a.txt", "   \n\n\t\n");
  write_file(dir / "blank/b.jsonl", "{\"text\": \"   \"}\n");
  m = error_of([&] { run_preprocess(base_options(dir / "blank", dir / "out")); });
  EXPECT_NE(
      m.find("no readable text: 2 files gave no non-empty document (1 empty after normalization"),
      std::string::npos)
      << m;
  EXPECT_FALSE(std::filesystem::exists(dir / "out/manifest.json"));
  write_file(dir / "one/a.txt", "a single document");
  m = error_of([&] { run_preprocess(base_options(dir / "one", dir / "out1")); });
  EXPECT_NE(m.find("only 1 document"), std::string::npos) << m;
}

TEST(PreprocessErrors, MalformedJsonlFailsOrSkips) {
  TempDir dir;
  make_corpus(dir / "raw", 60);
  write_file(dir / "raw/bad.jsonl",
             "{\"text\": \"fine\"}\n{\"text\": \"broken\"\n{\"other\": 1}\n");
  std::string m = error_of([&] { run_preprocess(base_options(dir / "raw", dir / "out")); });
  EXPECT_NE(m.find(dir / "raw/bad.jsonl:2: malformed JSONL line: not valid JSON"),
            std::string::npos)
      << m;
  EXPECT_FALSE(std::filesystem::exists(dir / "out/manifest.json"));
  auto o = base_options(dir / "raw", dir / "out");
  o.read.bad_jsonl = BadLinePolicy::kSkip;
  o.overwrite = true;
  auto r = run_preprocess(o);
  EXPECT_EQ(r.skipped_lines, 2);
  EXPECT_EQ(r.documents, 61);
  auto man = nlohmann::json::parse(read_text(dir / "out/manifest.json"));
  EXPECT_EQ(man["input"]["malformed_jsonl_skipped"], 2);
}

TEST(PreprocessErrors, InvalidUtf8IsReplacedCountedAndReportedWithTheFileName) {
  TempDir dir;
  make_corpus(dir / "raw", 60);
  write_file(dir / "raw/latin1.txt", "caf\xE9 cr\xE8me br\xFBl\xE9");
  ::testing::internal::CaptureStderr();
  auto r = run_preprocess(base_options(dir / "raw", dir / "out"));
  std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(r.invalid_utf8, 4);
  EXPECT_NE(log.find(dir / "raw/latin1.txt: 4 invalid UTF-8 sequence(s) replaced by U+FFFD"),
            std::string::npos)
      << log;
  Tokenizer tok = Tokenizer::load(dir / "out/tokenizer.model");
  auto docs = decode_split(dir / "out/train", tok);
  auto val = decode_split(dir / "out/validation", tok);
  docs.insert(docs.end(), val.begin(), val.end());
  EXPECT_EQ(std::count(docs.begin(), docs.end(), "caf\uFFFD cr\uFFFDme br\uFFFDl\uFFFD"), 1);
}

TEST(PreprocessErrors, VocabularyLargerThanTheCorpusSupports) {
  TempDir dir;
  make_corpus(dir / "raw", 30);
  auto o = base_options(dir / "raw", dir / "out");
  o.vocab_size = 20000;
  std::string m = error_of([&] { run_preprocess(o); });
  EXPECT_NE(m.find("--vocab_size 20000 is larger than this corpus can support"), std::string::npos)
      << m;
  EXPECT_FALSE(std::filesystem::exists(dir / "out/manifest.json"));
  EXPECT_THROW(run_preprocess(o),
               ConfigError);  // the directory is left without a dataset: not refused
}

TEST(PreprocessCli, CommandLineRunsAndFailsWithExitCodes) {
  std::string bin = env_or_empty("ANDYLLM_BIN");
  if (bin.empty() || !std::filesystem::exists(bin))
    GTEST_SKIP() << "andyllm binary not built (ANDYLLM_BIN unset)";
  TempDir dir;
  make_corpus(dir / "raw", 60);
  auto [rc, out] = shell(bin + " preprocess --input_dir " + (dir / "missing") + " --output_dir " +
                         (dir / "out"));
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("no such directory"), std::string::npos) << out;
  std::tie(rc, out) =
      shell(bin + " preprocess --input_dir " + (dir / "raw") + " --output_dir " + (dir / "out") +
            " --vocab_size 600 --txt_docs blank_lines --val_fraction 0.1 --threads 2");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("tokens/s"), std::string::npos) << out;  // the progress line
  EXPECT_TRUE(std::filesystem::exists(dir / "out/manifest.json"));
  std::tie(rc, out) =
      shell(bin + " preprocess --input_dir " + (dir / "raw") + " --output_dir " + (dir / "out"));
  EXPECT_EQ(rc, 2) << out;
  EXPECT_NE(out.find("pass --overwrite"), std::string::npos) << out;
  std::tie(rc, out) =
      shell(bin + " bench data --train_file " + (dir / "out/train") + " --tokenizer_path " +
            (dir / "out/tokenizer.model") + " --seq_len 16 --batch_size 2 --batches 20");
  ASSERT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("ms/batch"), std::string::npos) << out;

  // A read that fails while the other threads encode a batch (700 documents: two batches):
  // the threads stop before its documents go, the run fails, and no dataset is left.
  make_corpus(dir / "raw700", 700);
  std::tie(rc, out) = shell("ANDYLLM_FAILPOINTS=preprocess.read " + bin + " preprocess --input_dir " +
                            (dir / "raw700") + " --output_dir " + (dir / "out700") +
                            " --tokenizer_path " + (dir / "out/tokenizer.model") +
                            " --txt_docs blank_lines --threads 2");
  EXPECT_NE(rc, 0) << out;
  EXPECT_NE(out.find("failpoint preprocess.read"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(dir / "out700/manifest.json")) << out;
}
