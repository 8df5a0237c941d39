// Input files to normalized documents (.txt whole-file or blank-line blocks, .jsonl field).
#include "data/text_input.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/base/error.h"
#include "core/base/logging.h"
#include "core/base/strings.h"

namespace fs = std::filesystem;

namespace andy::data {

namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  ANDY_CHECK_T(IoError, in, path, ": cannot open: ", std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  ANDY_CHECK_T(IoError, !in.bad(), path, ": read error");
  return ss.str();
}

bool is_ws(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

// Splits on runs of lines that are empty or whitespace only.
std::vector<std::string> split_blank_lines(const std::string& text) {
  std::vector<std::string> out;
  std::string cur;
  size_t i = 0;
  while (i <= text.size()) {
    size_t e = text.find('\n', i);
    if (e == std::string::npos) e = text.size();
    std::string line = text.substr(i, e - i);
    bool blank = std::all_of(line.begin(), line.end(), is_ws);
    if (blank) {
      if (!cur.empty()) out.push_back(std::move(cur));
      cur.clear();
    } else {
      if (!cur.empty()) cur += '\n';
      cur += line;
    }
    i = e + 1;
  }
  if (!cur.empty()) out.push_back(std::move(cur));
  return out;
}

}  // namespace

std::vector<TextFile> list_input_files(const std::string& dir) {
  ANDY_CHECK_T(ConfigError, !dir.empty(),
               "--input_dir: expected a directory of .txt / .jsonl files");
  std::error_code ec;
  ANDY_CHECK_T(ConfigError, fs::exists(dir, ec), "--input_dir ", dir, ": no such directory");
  ANDY_CHECK_T(ConfigError, fs::is_directory(dir, ec), "--input_dir ", dir, ": not a directory");
  std::vector<TextFile> files;
  uint64_t total = 0;
  size_t others = 0;
  for (auto it =
           fs::recursive_directory_iterator(dir, fs::directory_options::skip_permission_denied, ec);
       it != fs::recursive_directory_iterator(); it.increment(ec)) {
    ANDY_CHECK_T(IoError, !ec, "--input_dir ", dir, ": cannot list: ", ec.message());
    if (!it->is_regular_file(ec)) continue;
    std::string p = it->path().string();
    if (!ends_with(p, ".txt") && !ends_with(p, ".jsonl")) {
      ++others;
      continue;
    }
    TextFile f;
    f.path = p;
    f.relative = fs::relative(it->path(), dir, ec).string();
    f.bytes = it->file_size(ec);
    total += f.bytes;
    files.push_back(std::move(f));
  }
  std::sort(files.begin(), files.end(),
            [](const TextFile& a, const TextFile& b) { return a.relative < b.relative; });
  ANDY_CHECK_T(
      ConfigError, !files.empty(), "--input_dir ", dir, ": no .txt or .jsonl files found (",
      others == 0 ? "the directory is empty" : std::to_string(others) + " other files ignored",
      ")");
  ANDY_CHECK_T(ConfigError, total > 0, "--input_dir ", dir, ": the ", files.size(),
               " .txt/.jsonl files are all empty: no text to process");
  return files;
}

int64_t sanitize_utf8(std::string* s) {
  const std::string& in = *s;
  std::string out;
  int64_t bad = 0;
  size_t i = 0, n = in.size();
  bool changed = false;
  while (i < n) {
    unsigned char c = in[i];
    if (c < 0x80) {
      if (changed) out += static_cast<char>(c);
      ++i;
      continue;
    }
    size_t len = 0;
    uint32_t cp = 0, min = 0;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
      cp = c & 0x1F;
      min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      cp = c & 0x0F;
      min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      cp = c & 0x07;
      min = 0x10000;
    }
    size_t j = 1;
    bool ok = len > 0;
    if (ok) {
      for (; j < len; ++j) {
        if (i + j >= n || (static_cast<unsigned char>(in[i + j]) & 0xC0) != 0x80) {
          ok = false;
          break;
        }
        cp = (cp << 6) | (static_cast<unsigned char>(in[i + j]) & 0x3F);
      }
      if (ok && (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))) {
        ok = false;
        j = len;
      }
    }
    if (ok) {
      if (changed) out.append(in, i, len);
      i += len;
      continue;
    }
    if (!changed) {
      out.assign(in, 0, i);
      changed = true;
    }
    out += "\xEF\xBF\xBD";
    ++bad;
    i += std::max<size_t>(1, j);  // the maximal invalid subpart
  }
  if (changed) *s = std::move(out);
  return bad;
}

std::string normalize_document(const std::string& text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\r') {
      out += '\n';
      if (i + 1 < text.size() && text[i + 1] == '\n') ++i;
    } else {
      out += text[i];
    }
  }
  size_t b = 0, e = out.size();
  while (b < e && is_ws(out[b])) ++b;
  while (e > b && is_ws(out[e - 1])) --e;
  return out.substr(b, e - b);
}

FileDocuments read_documents(const TextFile& file, const ReadOptions& opts) {
  FileDocuments r;
  std::string text = read_file(file.path);
  auto add = [&](const std::string& raw) {
    std::string d = normalize_document(raw);
    if (d.empty())
      ++r.empty_docs;
    else
      r.docs.push_back(std::move(d));
  };
  if (ends_with(file.path, ".jsonl")) {
    size_t i = 0;
    int64_t line_no = 0;
    while (i < text.size()) {
      size_t e = text.find('\n', i);
      if (e == std::string::npos) e = text.size();
      std::string line = text.substr(i, e - i);
      i = e + 1;
      ++line_no;
      if (std::all_of(line.begin(), line.end(), is_ws)) continue;
      r.invalid_utf8 += sanitize_utf8(&line);
      std::string problem;
      try {
        auto j = nlohmann::json::parse(line);
        if (!j.is_object())
          problem = "expected a JSON object";
        else if (!j.contains(opts.jsonl_field))
          problem = "no field \"" + opts.jsonl_field + "\" (set --jsonl_field)";
        else if (!j[opts.jsonl_field].is_string())
          problem = "field \"" + opts.jsonl_field + "\" is not a string";
        else
          add(j[opts.jsonl_field].get<std::string>());
      } catch (const nlohmann::json::exception& ex) {
        problem = std::string("not valid JSON: ") + ex.what();
      }
      if (!problem.empty()) {
        std::string msg =
            file.path + ":" + std::to_string(line_no) + ": malformed JSONL line: " + problem;
        ANDY_CHECK_T(ConfigError, opts.bad_jsonl == BadLinePolicy::kSkip, msg,
                     " (use --bad_jsonl skip to skip such lines)");
        if (opts.log_problems) log::warn(msg, " (skipped)");
        ++r.skipped_lines;
      }
    }
  } else {
    r.invalid_utf8 += sanitize_utf8(&text);
    if (opts.txt_mode == TxtMode::kWholeFile) {
      add(text);
    } else {
      for (auto& d : split_blank_lines(text)) add(d);
    }
  }
  if (r.invalid_utf8 > 0 && opts.log_problems) {
    log::warn(file.path, ": ", r.invalid_utf8, " invalid UTF-8 sequence(s) replaced by U+FFFD");
  }
  return r;
}

}  // namespace andy::data
