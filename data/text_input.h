// Raw text input for preprocessing: finding the files, splitting them into documents, and the
// text-level normalization applied before sentencepiece sees anything.
//
// Normalization (the round trip tests compare against this, and docs/DATA.md states it):
//   1. invalid UTF-8 sequences are replaced by U+FFFD (counted and reported per file);
//   2. line ends "\r\n" and "\r" become "\n";
//   3. leading and trailing whitespace of a document (space, tab, newline) is removed;
//   4. documents empty after that are dropped.
// Everything else, including inner newlines, repeated spaces, full-width punctuation and
// emoji, is kept byte for byte (sentencepiece itself runs with its identity rule).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace andy::data {

struct TextFile {
  std::string path;      // as opened
  std::string relative;  // path relative to the input directory (sort key, log name)
  uint64_t bytes = 0;
};

// Every .txt and .jsonl file below `dir` (recursively, following no symlinked dirs), sorted
// by relative path. Throws ConfigError when `dir` is missing, not a directory, or holds no
// .txt/.jsonl file, or when every such file is empty.
std::vector<TextFile> list_input_files(const std::string& dir);

enum class TxtMode { kWholeFile, kBlankLines };  // one document per file, or per blank-line block
enum class BadLinePolicy { kFail, kSkip };

struct ReadOptions {
  TxtMode txt_mode = TxtMode::kWholeFile;          // Default: one document per .txt file
  std::string jsonl_field = "text";                // Default: "text"
  BadLinePolicy bad_jsonl = BadLinePolicy::kFail;  // Default: a malformed line is fatal
  bool log_problems = true;  // warn about replaced UTF-8 and skipped lines (off for a second pass)
};

struct FileDocuments {
  std::vector<std::string> docs;  // normalized, non-empty
  int64_t invalid_utf8 = 0;       // sequences replaced by U+FFFD
  int64_t skipped_lines = 0;      // malformed JSONL lines skipped (kSkip)
  int64_t empty_docs = 0;         // documents dropped as empty after normalization
};

// Reads one file into documents. Throws IoError when it cannot be read; ConfigError naming
// file:line for a malformed JSONL line under kFail (not JSON, not an object, field missing or
// not a string). Under kSkip such lines are logged with file:line and counted.
FileDocuments read_documents(const TextFile& file, const ReadOptions& opts);

// Replaces invalid UTF-8 (bad lead bytes, truncated sequences, overlong forms, surrogates,
// code points above U+10FFFF) by U+FFFD in place; returns how many were replaced.
int64_t sanitize_utf8(std::string* s);
// Steps 2 and 3 of the normalization above (the input must already be valid UTF-8).
std::string normalize_document(const std::string& text);

}  // namespace andy::data
