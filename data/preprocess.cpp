// `andyllm preprocess` engine (see data/preprocess.h for the layout and the split rule).
// Convention: every step that can fail runs inside agreed(), so with several MPI ranks a
// failure on one rank reaches every rank as the same exception and nobody hangs.
#include "data/preprocess.h"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/base/logging.h"
#include "data/permutation.h"
#include "data/shard.h"
#include "data/tokenizer.h"
#include "parallel/mpi_utils.h"

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace andy::data {

namespace {

// The ranks preprocessing together: this one, their number, how many share this host.
struct RankGroup {
  int rank = 0, size = 1, local_size = 1;
  MPI_Comm comm = MPI_COMM_NULL;
};

// Runs fn on every rank; if it throws anywhere, every rank throws the lowest failing rank's
// error (run_agreed).
void agreed(const RankGroup& c, const std::function<void()>& fn) {
  run_agreed(c.comm, fn);
}

void sum_i64(const RankGroup& c, std::vector<int64_t>& v) {
  if (c.size == 1 || v.empty()) return;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(v.size()), MPI_INT64_T, MPI_SUM,
                          c.comm));
}

// Every rank's string, on rank 0 (empty elsewhere).
std::vector<std::string> gather_strings(const RankGroup& c, const std::string& s) {
  if (c.size == 1) return {s};
  int len = static_cast<int>(s.size());
  std::vector<int> lens(c.size), displs(c.size);
  MPI_CHECK(MPI_Gather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, c.comm));
  std::string all;
  if (c.rank == 0) {
    int total = 0;
    for (int r = 0; r < c.size; ++r) {
      displs[r] = total;
      total += lens[r];
    }
    all.resize(total);
  }
  MPI_CHECK(MPI_Gatherv(s.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR,
                        0, c.comm));
  std::vector<std::string> out;
  if (c.rank == 0)
    for (int r = 0; r < c.size; ++r) out.push_back(all.substr(displs[r], lens[r]));
  return out;
}

std::string human_bytes(double b) {
  char buf[32];
  if (b >= 1e9)
    std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else if (b >= 1e6)
    std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%.1f kB", b / 1e3);
  return buf;
}

std::string human_time(double s) {
  char buf[32];
  if (!std::isfinite(s)) return "?";
  int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(t / 3600),
                  (long long)(t % 3600 / 60));
  else if (t >= 60)
    std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(t / 60), (long long)(t % 60));
  else
    std::snprintf(buf, sizeof buf, "%llds", (long long)t);
  return buf;
}

// Rank 0's progress line: bytes, documents and tokens per second, and an ETA from the bytes.
class Progress {
 public:
  Progress(int64_t total_bytes, int ranks)
      : total_(total_bytes), ranks_(ranks), t0_(Clock::now()), last_(t0_) {}
  void add(int64_t bytes, int64_t docs, int64_t tokens) {
    bytes_ += bytes;
    docs_ += docs;
    tokens_ += tokens;
    if (std::chrono::duration<double>(Clock::now() - last_).count() >= 2.0) print(false);
  }
  void print(bool final) {
    last_ = Clock::now();
    double dt = std::max(1e-9, std::chrono::duration<double>(last_ - t0_).count());
    double rate = bytes_ / dt;
    double eta = rate > 0 ? (total_ - bytes_) / rate : INFINITY;
    char buf[256];
    std::snprintf(buf, sizeof buf, "%.1f%%", total_ > 0 ? 100.0 * bytes_ / total_ : 100.0);
    log::info("tokenize", ranks_ > 1 ? " (rank 0's share)" : "", ": ", buf, " ",
              human_bytes(bytes_), " / ", human_bytes(total_), ", ", docs_, " docs, ", tokens_,
              " tokens | ", human_bytes(rate), "/s, ", static_cast<int64_t>(docs_ / dt),
              " docs/s, ", static_cast<int64_t>(tokens_ / dt), " tokens/s | ",
              final ? "done in " + human_time(dt) : "ETA " + human_time(eta));
  }

 private:
  int64_t total_, bytes_ = 0, docs_ = 0, tokens_ = 0;
  int ranks_;
  Clock::time_point t0_, last_;
};

void validate(const PreprocessOptions& o) {
  ANDY_CHECK_T(ConfigError, !o.output_dir.empty(),
               "--output_dir: expected a directory to write the dataset into");
  ANDY_CHECK_T(ConfigError, o.vocab_size >= 0, "--vocab_size ", o.vocab_size,
               ": expected a positive integer");
  ANDY_CHECK_T(ConfigError, o.model_type == "bpe" || o.model_type == "unigram", "--model_type ",
               o.model_type, ": expected bpe or unigram");
  ANDY_CHECK_T(ConfigError, o.val_fraction >= 0 && o.val_fraction < 1, "--val_fraction ",
               o.val_fraction, ": expected 0 <= fraction < 1");
  ANDY_CHECK_T(ConfigError, o.shard_tokens >= 1, "--shard_tokens ", o.shard_tokens,
               ": expected >= 1");
  ANDY_CHECK_T(ConfigError, o.compression >= 0 && o.compression <= 9, "--compression ",
               o.compression, ": expected a gzip level 0..9");
  ANDY_CHECK_T(ConfigError, o.character_coverage > 0 && o.character_coverage <= 1,
               "--character_coverage ", o.character_coverage, ": expected 0 < coverage <= 1");
}

bool same_file(const std::string& a, const std::string& b) {
  std::error_code ec;
  return fs::exists(a, ec) && fs::exists(b, ec) && fs::equivalent(a, b, ec);
}

// Rank 0: refuses a non-empty output directory unless --overwrite, then clears what a
// previous run wrote (manifest first, so a half-cleared directory never looks complete).
void prepare_output(const PreprocessOptions& o, const std::string& tmp_dir) {
  fs::path out(o.output_dir);
  std::error_code ec;
  if (fs::exists(out, ec)) {
    ANDY_CHECK_T(ConfigError, fs::is_directory(out, ec), "--output_dir ", o.output_dir,
                 ": exists and is not a directory");
    bool empty = fs::directory_iterator(out, ec) == fs::directory_iterator();
    // What a killed run left (its temporary directory, no manifest): cleaned without --overwrite.
    const bool unfinished = fs::exists(out / ".preprocess-tmp") && !fs::exists(out / "manifest.json");
    if (unfinished && !empty)
      log::info("preprocess: ", o.output_dir, " holds an unfinished run (.preprocess-tmp/, no manifest.json): removing it");
    if (!empty) {
      ANDY_CHECK_T(
          ConfigError, o.overwrite || unfinished, "--output_dir ", o.output_dir,
          " already exists and is not empty (",
          fs::exists(out / "manifest.json") ? "it holds a dataset" : "it holds other files",
          "): refusing to overwrite it; pass --overwrite to replace the dataset, or choose another "
          "directory");
      fs::remove(out / "manifest.json", ec);
      for (const char* d : {"train", "validation", ".preprocess-tmp"}) fs::remove_all(out / d, ec);
      for (const char* f : {"tokenizer.model", "tokenizer.vocab"}) {
        if (!same_file((out / f).string(), o.tokenizer_path)) fs::remove(out / f, ec);
      }
    }
  }
  for (const auto& d : {out, out / "train", out / "validation", fs::path(tmp_dir)}) {
    fs::create_directories(d, ec);
    ANDY_CHECK_T(IoError, !ec, d.string(), ": cannot create directory: ", ec.message());
  }
}

// Writes a document's lines as tokenizer-training sentences, splitting lines longer than
// sentencepiece's limit at character boundaries.
void write_training_lines(std::ofstream& out, const std::string& doc) {
  constexpr size_t kMax = 4000;
  size_t i = 0;
  while (i < doc.size()) {
    size_t e = doc.find('\n', i);
    if (e == std::string::npos) e = doc.size();
    size_t b = i;
    while (b < e) {
      size_t n = std::min(kMax, e - b);
      while (b + n < e && n > 0 && (static_cast<unsigned char>(doc[b + n]) & 0xC0) == 0x80) --n;
      if (n == 0) n = std::min(kMax, e - b);
      bool blank = std::all_of(doc.begin() + b, doc.begin() + b + n,
                               [](char ch) { return ch == ' ' || ch == '\t'; });
      if (!blank) {
        out.write(doc.data() + b, static_cast<std::streamsize>(n));
        out.put('\n');
      }
      b += n;
    }
    i = e + 1;
  }
}

PreprocessResult run_prepared(const PreprocessOptions& opts, const RankGroup& ctx,
                              const std::vector<TextFile>& files, const std::string& tmp_dir,
                              bool train_tokenizer, Clock::time_point t_start);

}  // namespace

PreprocessResult run_preprocess(const PreprocessOptions& opts, const MpiComm* comm) {
  auto t_start = Clock::now();
  RankGroup ctx;
  if (comm) {
    ctx.rank = comm->rank();
    ctx.size = comm->size();
    ctx.comm = comm->get();
    if (ctx.size > 1) {
      MPI_Comm local;
      MPI_CHECK(
          MPI_Comm_split_type(ctx.comm, MPI_COMM_TYPE_SHARED, ctx.rank, MPI_INFO_NULL, &local));
      MPI_CHECK(MPI_Comm_size(local, &ctx.local_size));
      MPI_CHECK(MPI_Comm_free(&local));
    }
  }
  const fs::path out(opts.output_dir);
  const std::string tmp_dir = (out / ".preprocess-tmp").string();
  const bool train_tokenizer = opts.tokenizer_path.empty();

  // 1. Options, input files, output directory.
  std::vector<TextFile> files;
  agreed(ctx, [&] {
    validate(opts);
    files = list_input_files(opts.input_dir);
    if (!train_tokenizer) {
      ANDY_CHECK_T(ConfigError, fs::is_regular_file(opts.tokenizer_path), "--tokenizer_path ",
                   opts.tokenizer_path,
                   ": no such file (expected an existing sentencepiece .model)");
    }
  });
  bool out_existed = fs::exists(out);
  agreed(ctx, [&] {
    if (ctx.rank == 0) prepare_output(opts, tmp_dir);
  });
  try {
    return run_prepared(opts, ctx, files, tmp_dir, train_tokenizer, t_start);
  } catch (...) {
    // Every rank is here (agreed()): rank 0 removes what this run wrote, so a failed run
    // leaves no half dataset behind and a rerun needs no --overwrite.
    if (ctx.rank == 0) {
      std::error_code ec;
      for (const char* d : {"train", "validation", ".preprocess-tmp", "manifest.json.tmp"})
        fs::remove_all(out / d, ec);
      if (train_tokenizer) {
        fs::remove(out / "tokenizer.model", ec);
        fs::remove(out / "tokenizer.vocab", ec);
      }
      if (!out_existed && fs::is_empty(out, ec)) fs::remove(out, ec);
    }
    throw;
  }
}

namespace {

PreprocessResult run_prepared(const PreprocessOptions& opts, const RankGroup& ctx,
                              const std::vector<TextFile>& files, const std::string& tmp_dir,
                              bool train_tokenizer, Clock::time_point t_start) {
  const fs::path out(opts.output_dir);
  PreprocessResult res;
  int64_t total_bytes = 0;
  for (const auto& f : files) total_bytes += static_cast<int64_t>(f.bytes);
  log::info("preprocess: ", files.size(), " input files, ",
            human_bytes(static_cast<double>(total_bytes)), " in ", opts.input_dir, " -> ",
            opts.output_dir, " (", ctx.size, " rank", ctx.size > 1 ? "s" : "", ")");

  // 2. This rank's files (largest first to the least-loaded rank: deterministic).
  std::vector<size_t> order(files.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return files[a].bytes > files[b].bytes; });
  std::vector<uint64_t> load(ctx.size, 0);
  std::vector<int> owner(files.size());
  for (size_t i : order) {
    int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[r] += files[i].bytes + 1;
  }
  std::vector<size_t> mine;
  for (size_t i = 0; i < files.size(); ++i)
    if (owner[i] == ctx.rank) mine.push_back(i);

  // 3. Read and normalize, count documents, write tokenizer-training text. Nothing is kept:
  //    step 5 reads each file again, so memory stays bounded by the largest file.
  std::vector<int64_t> doc_counts(files.size(), 0);
  std::vector<int64_t> stats(4, 0);  // invalid_utf8, skipped lines, empty docs, doc bytes
  agreed(ctx, [&] {
    std::ofstream sp_in;
    std::string sp_path = tmp_dir + "/spm_input." + std::to_string(ctx.rank) + ".txt";
    if (train_tokenizer) {
      sp_in.open(sp_path, std::ios::binary);
      ANDY_CHECK_T(IoError, sp_in, sp_path, ": cannot create");
    }
    for (size_t i : mine) {
      FileDocuments fd = read_documents(files[i], opts.read);
      stats[0] += fd.invalid_utf8;
      stats[1] += fd.skipped_lines;
      stats[2] += fd.empty_docs;
      for (const auto& d : fd.docs) {
        stats[3] += static_cast<int64_t>(d.size());
        if (train_tokenizer) write_training_lines(sp_in, d);
      }
      doc_counts[i] = static_cast<int64_t>(fd.docs.size());
    }
    if (train_tokenizer) {
      sp_in.close();
      ANDY_CHECK_T(IoError, sp_in, sp_path, ": write failed (disk full?)");
    }
  });
  sum_i64(ctx, doc_counts);
  std::vector<int64_t> my_doc_bytes{stats[3]};
  sum_i64(ctx, stats);
  res.files = static_cast<int64_t>(files.size());
  res.bytes = total_bytes;
  res.invalid_utf8 = stats[0];
  res.skipped_lines = stats[1];
  res.empty_documents = stats[2];
  std::vector<int64_t> first_doc(files.size() + 1, 0);
  for (size_t i = 0; i < files.size(); ++i) first_doc[i + 1] = first_doc[i] + doc_counts[i];
  const int64_t n_docs = first_doc.back();
  res.documents = n_docs;
  agreed(ctx, [&] {
    ANDY_CHECK_T(ConfigError, n_docs > 0, "--input_dir ", opts.input_dir,
                 ": no readable text: ", files.size(), " files gave no non-empty document (",
                 res.empty_documents, " empty after normalization, ", res.skipped_lines,
                 " malformed JSONL lines skipped)");
    ANDY_CHECK_T(ConfigError, opts.val_fraction == 0 || n_docs >= 2, "--val_fraction ",
                 opts.val_fraction, ": the corpus has only ", n_docs,
                 " document, so it cannot be split by documents into train and validation (use "
                 "--val_fraction 0, "
                 "or --txt_docs blank_lines to split .txt files at blank lines)");
  });
  log::info("preprocess: ", n_docs, " documents (", res.empty_documents, " empty dropped, ",
            res.invalid_utf8, " invalid UTF-8 sequences replaced, ", res.skipped_lines,
            " malformed JSONL lines skipped)");

  // 4. Tokenizer: trained on rank 0 from every rank's text, or the given one copied in.
  const std::string model_path = (out / "tokenizer.model").string();
  agreed(ctx, [&] {
    if (ctx.rank != 0) return;
    if (train_tokenizer) {
      TokenizerTrainOptions t;
      for (int r = 0; r < ctx.size; ++r)
        t.input_files.push_back(tmp_dir + "/spm_input." + std::to_string(r) + ".txt");
      t.model_prefix = (out / "tokenizer").string();
      t.vocab_size = opts.vocab_size > 0 ? opts.vocab_size : 32000;
      t.model_type = opts.model_type;
      t.character_coverage = opts.character_coverage;
      t.input_sentence_size = opts.tokenizer_sentences;
      t.num_threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
      t.seed = static_cast<uint32_t>(opts.seed);
      auto t0 = Clock::now();
      log::info("preprocess: training a ", opts.model_type, " sentencepiece tokenizer, vocab_size ",
                t.vocab_size);
      Tokenizer::train(t);
      log::info("preprocess: tokenizer trained in ",
                human_time(std::chrono::duration<double>(Clock::now() - t0).count()), " -> ",
                model_path);
    } else if (!same_file(opts.tokenizer_path, model_path)) {
      std::error_code ec;
      fs::copy_file(opts.tokenizer_path, model_path, fs::copy_options::overwrite_existing, ec);
      ANDY_CHECK_T(IoError, !ec, "--tokenizer_path ", opts.tokenizer_path, ": cannot copy to ",
                   model_path, ": ", ec.message());
      std::string vocab = fs::path(opts.tokenizer_path).replace_extension(".vocab").string();
      if (fs::is_regular_file(vocab))
        fs::copy_file(vocab, (out / "tokenizer.vocab").string(),
                      fs::copy_options::overwrite_existing, ec);
    }
  });
  Tokenizer tok;
  agreed(ctx, [&] { tok = Tokenizer::load(model_path); });
  res.vocab_size = tok.vocab_size();
  res.tokenizer_path = model_path;
  res.tokenizer_checksum = tok.checksum();
  agreed(ctx, [&] {
    ANDY_CHECK_T(ConfigError,
                 train_tokenizer || opts.vocab_size == 0 || opts.vocab_size == tok.vocab_size(),
                 "--vocab_size ", opts.vocab_size,
                 " differs from the vocabulary of --tokenizer_path ", opts.tokenizer_path, " (",
                 tok.vocab_size(), "); drop --vocab_size or use the matching tokenizer");
  });

  // 5. Tokenize (threads) and write this rank's shards.
  const int64_t n_val =
      opts.val_fraction == 0
          ? 0
          : std::clamp<int64_t>(std::llround(n_docs * opts.val_fraction), 1, n_docs - 1);
  IndexPermutation split_perm(static_cast<uint64_t>(n_docs), mix64(opts.seed) ^ 0x5EEDULL);
  int threads = opts.threads;
  if (threads <= 0) {
    threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / ctx.local_size);
  }
  nlohmann::json my_shards = nlohmann::json::array();
  agreed(ctx, [&] {
    ShardWriteOptions wo;
    wo.chunk_tokens = opts.chunk_tokens;
    wo.compression = opts.compression;
    const char* split_names[2] = {"train", "validation"};
    std::unique_ptr<ShardWriter> writers[2];
    int shard_index[2] = {0, 0};
    auto close = [&](int s) {
      if (!writers[s] || writers[s]->documents() == 0) return;
      ShardSummary sum = writers[s]->finish();
      my_shards.push_back({{"split", split_names[s]},
                           {"file", fs::relative(sum.path, out).string()},
                           {"tokens", sum.tokens},
                           {"documents", sum.documents},
                           {"checksum", sum.checksum}});
      writers[s].reset();
    };
    auto writer_for = [&](int s, int64_t n) -> ShardWriter& {
      if (writers[s] && writers[s]->tokens() > 0 && writers[s]->tokens() + n > opts.shard_tokens)
        close(s);
      if (!writers[s]) {
        char name[64];
        std::snprintf(name, sizeof name, "shard-%05d-%05d.h5", ctx.rank, shard_index[s]++);
        writers[s] =
            std::make_unique<ShardWriter>((out / split_names[s] / name).string(), split_names[s],
                                          tok.vocab_size(), tok.checksum(), tok.eos_id(), wo);
      }
      return *writers[s];
    };
    Progress progress(my_doc_bytes[0], ctx.size);
    ReadOptions again = opts.read;
    again.log_problems = false;
    for (size_t fi : mine) {
      std::vector<std::string> fdocs = read_documents(files[fi], again).docs;
      ANDY_CHECK_T(IoError, static_cast<int64_t>(fdocs.size()) == doc_counts[fi], files[fi].path,
                   ": changed while preprocessing (", doc_counts[fi], " documents, now ",
                   fdocs.size(), ")");
      const size_t chunk = 512;
      for (size_t b = 0; b < fdocs.size(); b += chunk) {
        size_t e = std::min(fdocs.size(), b + chunk);
        std::vector<std::vector<int32_t>> ids(e - b);
        std::atomic<size_t> next{b};
        std::exception_ptr err;
        std::mutex err_mu;
        auto work = [&] {
          try {
            for (size_t d; (d = next++) < e;) ids[d - b] = tok.encode(fdocs[d]);
          } catch (...) {
            std::lock_guard<std::mutex> l(err_mu);
            err = std::current_exception();
          }
        };
        std::vector<std::thread> pool;
        int n_threads = static_cast<int>(std::min<size_t>(threads, e - b));
        for (int t = 1; t < n_threads; ++t) pool.emplace_back(work);
        work();
        for (auto& t : pool) t.join();
        if (err) std::rethrow_exception(err);
        int64_t bytes = 0, tokens = 0;
        for (size_t d = b; d < e; ++d) {
          auto& v = ids[d - b];
          v.push_back(tok.eos_id());
          int64_t gid = first_doc[fi] + static_cast<int64_t>(d);
          int s = static_cast<int64_t>(split_perm(static_cast<uint64_t>(gid))) < n_val ? 1 : 0;
          writer_for(s, static_cast<int64_t>(v.size())).add_document(v.data(), v.size());
          bytes += static_cast<int64_t>(fdocs[d].size());
          tokens += static_cast<int64_t>(v.size());
          std::string().swap(fdocs[d]);
        }
        progress.add(bytes, static_cast<int64_t>(e - b), tokens);
      }
    }
    close(0);
    close(1);
    progress.print(true);
  });

  // 6. Manifest (rank 0), written last under a temporary name.
  auto all = gather_strings(ctx, my_shards.dump());
  agreed(ctx, [&] {
    if (ctx.rank != 0) return;
    nlohmann::json splits = {
        {"train", {{"documents", 0}, {"tokens", 0}, {"shards", nlohmann::json::array()}}},
        {"validation", {{"documents", 0}, {"tokens", 0}, {"shards", nlohmann::json::array()}}}};
    for (const auto& s : all) {
      for (const auto& sh : nlohmann::json::parse(s)) {
        auto& sp = splits[sh["split"].get<std::string>()];
        sp["documents"] = sp["documents"].get<int64_t>() + sh["documents"].get<int64_t>();
        sp["tokens"] = sp["tokens"].get<int64_t>() + sh["tokens"].get<int64_t>();
        nlohmann::json entry = sh;
        entry.erase("split");
        sp["shards"].push_back(entry);
      }
    }
    for (auto& [name, sp] : splits.items()) {
      std::sort(
          sp["shards"].begin(), sp["shards"].end(),
          [](const nlohmann::json& a, const nlohmann::json& b) { return a["file"] < b["file"]; });
    }
    nlohmann::json m = {
        {"format_version", kShardFormatVersion},
        {"created_by", std::string("andyllm preprocess ") + ANDYLLM_VERSION},
        {"tokenizer", "tokenizer.model"},
        {"tokenizer_checksum", tok.checksum()},
        {"vocab_size", tok.vocab_size()},
        {"token_dtype", tok.vocab_size() <= 65536 ? "uint16" : "uint32"},
        {"special_ids",
         {{"pad", tok.pad_id()},
          {"unk", tok.unk_id()},
          {"bos", tok.bos_id()},
          {"eos", tok.eos_id()}}},
        {"normalization",
         "invalid UTF-8 -> U+FFFD; CRLF/CR -> LF; document stripped of leading/trailing "
         "whitespace; empty documents "
         "dropped; sentencepiece identity rule with byte fallback"},
        {"end_of_document", "eos"},
        {"seed", opts.seed},
        {"val_fraction", opts.val_fraction},
        {"ranks", ctx.size},
        {"input",
         {{"dir", opts.input_dir},
          {"files", res.files},
          {"bytes", res.bytes},
          {"documents", n_docs},
          {"invalid_utf8_replaced", res.invalid_utf8},
          {"malformed_jsonl_skipped", res.skipped_lines},
          {"empty_documents_dropped", res.empty_documents}}},
        {"splits", splits},
    };
    ANDY_CHECK_T(ConfigError, splits["train"]["tokens"].get<int64_t>() > 0,
                 "preprocess produced no training tokens");
    std::string tmp = (out / "manifest.json.tmp").string();
    {
      std::ofstream f(tmp);
      f << m.dump(2) << "\n";
      f.close();
      ANDY_CHECK_T(IoError, f, tmp, ": write failed");
    }
    std::error_code ec;
    fs::rename(tmp, out / "manifest.json", ec);
    ANDY_CHECK_T(IoError, !ec, tmp, ": cannot rename to manifest.json: ", ec.message());
    fs::remove_all(tmp_dir, ec);
    res.train_documents = splits["train"]["documents"];
    res.train_tokens = splits["train"]["tokens"];
    res.train_shards = static_cast<int64_t>(splits["train"]["shards"].size());
    res.validation_documents = splits["validation"]["documents"];
    res.validation_tokens = splits["validation"]["tokens"];
    res.validation_shards = static_cast<int64_t>(splits["validation"]["shards"].size());
  });
  // Every rank gets rank 0's totals.
  std::vector<int64_t> totals = {res.train_documents,   res.train_tokens,
                                 res.train_shards,      res.validation_documents,
                                 res.validation_tokens, res.validation_shards};
  if (ctx.size > 1) MPI_CHECK(MPI_Bcast(totals.data(), 6, MPI_INT64_T, 0, ctx.comm));
  res.train_documents = totals[0];
  res.train_tokens = totals[1];
  res.train_shards = totals[2];
  res.validation_documents = totals[3];
  res.validation_tokens = totals[4];
  res.validation_shards = totals[5];
  res.manifest_path = (out / "manifest.json").string();
  res.seconds = std::chrono::duration<double>(Clock::now() - t_start).count();
  log::info("preprocess: done in ", human_time(res.seconds), ": train ", res.train_documents,
            " docs, ", res.train_tokens, " tokens in ", res.train_shards, " shards; validation ",
            res.validation_documents, " docs, ", res.validation_tokens, " tokens in ",
            res.validation_shards, " shards; vocab ", res.vocab_size, " -> ", res.manifest_path);
  return res;
}

}  // namespace

}  // namespace andy::data
