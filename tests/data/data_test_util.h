// Helpers for the data-layer tests: temporary directories, a small multilingual corpus
// (English, Chinese, mixed with emoji; every document unique), reading a split back.
#pragma once

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "core/base/error.h"
#include "data/shard.h"
#include "data/tokenizer.h"

namespace andy::data::testing {

namespace fs = std::filesystem;

// A fresh directory under $TMPDIR (or /tmp), removed by the destructor.
class TempDir {
 public:
  explicit TempDir(const std::string& tag = "andyllm-data") {
    std::string base = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
    std::string tmpl = base + "/" + tag + "-XXXXXX";
    std::vector<char> buf(tmpl.begin(), tmpl.end());
    buf.push_back('\0');
    path_ = mkdtemp(buf.data());
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

// The message of the andy::Error that fn throws, or "(no error)".
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

inline void write_file(const std::string& path, const std::string& content) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream f(path, std::ios::binary);
  f << content;
}

inline std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

// Document i of the test corpus: kind 0 English, 1 Chinese, 2 mixed with emoji. Unique by i.
inline std::string corpus_doc(int i) {
  static const char* en[] = {"the quick brown fox jumps over the lazy dog",
                             "a stitch in time saves nine",
                             "all that glitters is not gold",
                             "knowledge is power and time is money",
                             "the early bird catches the worm",
                             "where there is a will there is a way"};
  static const char* zh[] = {
      "我们今天去公园散步。",       "这是一个简单的中文句子，用来测试分词器。",
      "天气很好，我们一起吃饭吧！", "机器学习需要大量的数据。",
      "他说：“你好，世界。”",       "中文和英文混合在一起也可以。"};
  static const char* emoji[] = {"😀", "🚀", "👍🏽", "🇨🇳", "❤️", "🎉"};
  std::string d;
  int kind = i % 3;
  for (int s = 0; s < 3 + i % 4; ++s) {
    int k = (i * 7 + s * 3) % 6;
    if (kind == 0)
      d += std::string(en[k]) + " (" + std::to_string(i * 10 + s) + "). ";
    else if (kind == 1)
      d += std::string(zh[k]) + std::to_string(i) + "号";
    else
      d += std::string(zh[k]) + " " + en[(k + 1) % 6] + " " + emoji[(i + s) % 6] + " ";
    if (s == 1) d += "\n";
  }
  return "doc " + std::to_string(i) + ": " + d;
}

// Trains the tests' tokenizer (600 pieces on 300 corpus_doc documents: English, Chinese, emoji,
// so rarer characters fall back to bytes) into dir/tok.model; returns its path.
inline std::string train_test_tokenizer(const std::string& dir) {
  std::string corpus;
  for (int i = 0; i < 300; ++i) corpus += corpus_doc(i) + "\n";
  write_file(dir + "/corpus.txt", corpus);
  TokenizerTrainOptions o;
  o.input_files = {dir + "/corpus.txt"};
  o.model_prefix = dir + "/tok";
  o.vocab_size = 600;
  Tokenizer::train(o);
  return dir + "/tok.model";
}

// Every document of a split directory, decoded (trailing eos checked and dropped).
inline std::vector<std::string> decode_split(const std::string& dir, const Tokenizer& tok) {
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".h5") files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  std::vector<std::string> docs;
  for (const auto& f : files) {
    ShardReader r(f);
    auto tokens = r.read_all();
    auto off = r.doc_offsets();
    for (size_t d = 0; d + 1 < off.size(); ++d) {
      std::vector<int32_t> ids(tokens.begin() + off[d], tokens.begin() + off[d + 1]);
      if (ids.empty() || ids.back() != tok.eos_id()) {
        docs.push_back("<document without trailing eos>");
        continue;
      }
      ids.pop_back();
      docs.push_back(tok.decode(ids));
    }
  }
  return docs;
}

constexpr int64_t kVocab = 50000;
const std::string kChecksum = "fnv1a64:00000000000000aa";

// Writes `split` under root with shards of the given token counts (a stream 0, 1, 2, ... mod
// kVocab, documents of 50 tokens) and a manifest.json listing them.
inline void make_split(const std::string& root, const std::string& split,
                       const std::vector<int64_t>& shard_tokens, int64_t vocab = kVocab,
                       const std::string& checksum = kChecksum) {
  std::filesystem::create_directories(root + "/" + split);
  nlohmann::json shards = nlohmann::json::array();
  int64_t next = 0;
  for (size_t s = 0; s < shard_tokens.size(); ++s) {
    char name[64];
    std::snprintf(name, sizeof name, "shard-00000-%05zu.h5", s);
    ShardWriteOptions wo;
    wo.chunk_tokens = 64;
    ShardWriter w(root + "/" + split + "/" + name, split, vocab, checksum, 3, wo);
    for (int64_t left = shard_tokens[s]; left > 0;) {
      int64_t n = std::min<int64_t>(50, left);
      std::vector<int32_t> ids(n);
      for (auto& id : ids) id = static_cast<int32_t>(next++ % vocab);
      w.add_document(ids.data(), ids.size());
      left -= n;
    }
    ShardSummary sum = w.finish();
    shards.push_back({{"file", split + "/" + name},
                      {"tokens", sum.tokens},
                      {"documents", sum.documents},
                      {"checksum", sum.checksum}});
  }
  nlohmann::json m;
  std::string mpath = root + "/manifest.json";
  if (std::filesystem::exists(mpath)) m = nlohmann::json::parse(read_text(mpath));
  m["format_version"] = kShardFormatVersion;
  m["splits"][split] = {{"shards", shards}};
  write_file(mpath, m.dump(2));
}

// Runs a shell command; returns (exit code, stdout+stderr).
inline std::pair<int, std::string> shell(const std::string& cmd) {
  std::string out;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return {-1, ""};
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  int st = pclose(p);
  return {WIFEXITED(st) ? WEXITSTATUS(st) : 128, out};
}

inline std::string env_or_empty(const char* name) {
  const char* v = std::getenv(name);
  return v ? v : "";
}

// True when Debian's /usr/bin/python3 can import `module`.
inline bool python_has(const std::string& module) {
  return shell("/usr/bin/python3 -c 'import " + module + "'").first == 0;
}

// The ids Debian's Python sentencepiece (an independent reader of the .model) gives for each
// text, one list per text. Writes its script and input under `dir`; throws andy::Error with the
// script's output when it fails. Check python_has("sentencepiece") first.
inline std::vector<std::vector<int32_t>> python_sentencepiece_ids(const std::string& model_file,
                                                                  const std::vector<std::string>& texts,
                                                                  const std::string& dir) {
  std::string input;
  for (const auto& t : texts) input += t + '\x1e';  // record separator: texts may hold newlines
  write_file(dir + "/py_sp_texts.bin", input);
  write_file(dir + "/py_sp_ids.py",
             "import sys, sentencepiece as spm\n"
             "sp = spm.SentencePieceProcessor(model_file=sys.argv[1])\n"
             "data = open(sys.argv[2], 'rb').read().decode('utf-8').split('\\x1e')[:-1]\n"
             "for t in data: print(' '.join(map(str, sp.encode(t))))\n");
  auto [rc, out] = shell("/usr/bin/python3 " + dir + "/py_sp_ids.py " + model_file + " " + dir + "/py_sp_texts.bin");
  if (rc != 0) throw Error("python sentencepiece failed (exit " + std::to_string(rc) + "):\n" + out);
  std::vector<std::vector<int32_t>> ids;
  std::istringstream lines(out);
  for (std::string line; ids.size() < texts.size() && std::getline(lines, line);) {
    std::istringstream words(line);
    ids.emplace_back(std::istream_iterator<int32_t>(words), std::istream_iterator<int32_t>());
  }
  if (ids.size() != texts.size())
    throw Error("python sentencepiece printed " + std::to_string(ids.size()) + " lines for " +
                std::to_string(texts.size()) + " texts:\n" + out);
  return ids;
}

}  // namespace andy::data::testing
