// Text input: file discovery, UTF-8 repair, normalization, document splitting, JSONL errors.
#include <gtest/gtest.h>

#include "core/base/error.h"
#include "data/text_input.h"
#include "tests/data/data_test_util.h"

using andy::data::testing::error_of;

using namespace andy;
using namespace andy::data;
using andy::data::testing::TempDir;
using andy::data::testing::write_file;

TEST(Utf8, ValidTextIsUntouched) {
  std::string s = "hello 你好 😀 ü";
  EXPECT_EQ(sanitize_utf8(&s), 0);
  EXPECT_EQ(s, "hello 你好 😀 ü");
}

TEST(Utf8, InvalidSequencesAreReplacedAndCounted) {
  struct Case {
    std::string in, out;
    int64_t bad;
  };
  const std::string R = "\xEF\xBF\xBD";
  std::vector<Case> cases = {
      {"a\xFFz", "a" + R + "z", 1},     // invalid byte
      {"a\xE4\xBD", "a" + R, 1},        // truncated 3-byte sequence at the end
      {"\xC0\xAF", R + R, 2},           // overlong '/' (C0 is never valid)
      {"\xE0\x80\xAF", R, 1},           // overlong 3-byte form
      {"\xED\xA0\x80x", R + "x", 1},    // UTF-16 surrogate
      {"\xF4\x90\x80\x80", R, 1},       // above U+10FFFF
      {"\x80\x80ok", R + R + "ok", 2},  // stray continuation bytes
  };
  for (auto c : cases) {
    std::string s = c.in;
    EXPECT_EQ(sanitize_utf8(&s), c.bad) << "input bytes " << ::testing::PrintToString(c.in);
    EXPECT_EQ(s, c.out);
  }
}

TEST(Normalize, LineEndsAndOuterWhitespace) {
  EXPECT_EQ(normalize_document("\r\n  a\r\nb\rc  \n\n"), "a\nb\nc");
  EXPECT_EQ(normalize_document("inner  spaces\tkept\n\nand blank lines"),
            "inner  spaces\tkept\n\nand blank lines");
  EXPECT_EQ(normalize_document(" \n\t "), "");
}

TEST(ReadDocuments, TxtWholeFileAndBlankLines) {
  TempDir dir;
  write_file(dir / "a.txt", "first para\nline two\n\n  \nsecond para\r\n\r\nthird\n");
  TextFile f{dir / "a.txt", "a.txt", 0};
  ReadOptions whole;
  auto r = read_documents(f, whole);
  ASSERT_EQ(r.docs.size(), 1u);
  EXPECT_EQ(r.docs[0], "first para\nline two\n\n  \nsecond para\n\nthird");
  ReadOptions blank;
  blank.txt_mode = TxtMode::kBlankLines;
  r = read_documents(f, blank);
  EXPECT_EQ(r.docs, (std::vector<std::string>{"first para\nline two", "second para", "third"}));
}

TEST(ReadDocuments, InvalidUtf8IsReportedNotFatal) {
  TempDir dir;
  write_file(dir / "bad.txt", "good \xFF\xFE text");
  auto r = read_documents(TextFile{dir / "bad.txt", "bad.txt", 0}, ReadOptions{});
  EXPECT_EQ(r.invalid_utf8, 2);
  ASSERT_EQ(r.docs.size(), 1u);
  EXPECT_EQ(r.docs[0], "good \xEF\xBF\xBD\xEF\xBF\xBD text");
}

TEST(ReadDocuments, JsonlFieldAndMalformedLines) {
  TempDir dir;
  write_file(
      dir / "d.jsonl",
      "{\"text\": \"one\"}\n\n{\"text\": \"两个\", \"id\": 2}\n{\"body\": \"x\"}\nnot json\n[1,2]\n"
      "{\"text\": 5}\n{\"text\": \"  \"}\n");
  TextFile f{dir / "d.jsonl", "d.jsonl", 0};
  std::string msg = error_of([&] { read_documents(f, ReadOptions{}); });
  EXPECT_NE(msg.find(dir / "d.jsonl:4: malformed JSONL line: no field \"text\""), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("--bad_jsonl skip"), std::string::npos) << msg;

  ReadOptions skip;
  skip.bad_jsonl = BadLinePolicy::kSkip;
  auto r = read_documents(f, skip);
  EXPECT_EQ(r.docs, (std::vector<std::string>{"one", "两个"}));
  EXPECT_EQ(r.skipped_lines,
            4);  // lines 4 (no field), 5 (not JSON), 6 (not an object), 7 (not a string)
  EXPECT_EQ(r.empty_docs, 1);

  ReadOptions field;
  field.jsonl_field = "body";
  field.bad_jsonl = BadLinePolicy::kFail;
  msg = error_of([&] { read_documents(f, field); });
  EXPECT_NE(msg.find("d.jsonl:1: malformed JSONL line: no field \"body\""), std::string::npos)
      << msg;

  write_file(dir / "e.jsonl", "{\"text\": \"ok\"}\n{\"text\": \"unterminated}\n");
  msg = error_of([&] { read_documents(TextFile{dir / "e.jsonl", "e.jsonl", 0}, ReadOptions{}); });
  EXPECT_NE(msg.find("e.jsonl:2: malformed JSONL line: not valid JSON"), std::string::npos) << msg;
}

TEST(ListInputFiles, FindsTxtAndJsonlRecursivelySorted) {
  TempDir dir;
  write_file(dir / "b/z.txt", "z");
  write_file(dir / "a.jsonl", "{\"text\":\"a\"}");
  write_file(dir / "b/a.txt", "a");
  write_file(dir / "ignored.md", "#");
  auto files = list_input_files(dir.path());
  ASSERT_EQ(files.size(), 3u);
  EXPECT_EQ(files[0].relative, "a.jsonl");
  EXPECT_EQ(files[1].relative, "b/a.txt");
  EXPECT_EQ(files[2].relative, "b/z.txt");
}

TEST(ListInputFiles, BadDirectoriesHaveClearMessages) {
  TempDir dir;
  EXPECT_NE(error_of([&] { list_input_files(dir / "missing"); }).find("missing: no such directory"),
            std::string::npos);
  write_file(dir / "file.txt", "x");
  EXPECT_NE(error_of([&] { list_input_files(dir / "file.txt"); }).find("not a directory"),
            std::string::npos);
  std::filesystem::create_directories(dir / "empty");
  EXPECT_NE(error_of([&] {
              list_input_files(dir / "empty");
            }).find("no .txt or .jsonl files found (the directory is empty)"),
            std::string::npos);
  write_file(dir / "others/readme.md", "x");
  EXPECT_NE(error_of([&] { list_input_files(dir / "others"); }).find("1 other files ignored"),
            std::string::npos);
  write_file(dir / "zero/a.txt", "");
  EXPECT_NE(
      error_of([&] { list_input_files(dir / "zero"); }).find("are all empty: no text to process"),
      std::string::npos);
  EXPECT_THROW(list_input_files(dir / "zero"), ConfigError);
}
