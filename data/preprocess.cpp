// `andyllm preprocess` engine (see data/preprocess.h for the layout and the split rule).
// Convention: every step that can fail runs inside agreed(), so with several MPI ranks a
// failure on one rank reaches every rank as the same exception and nobody hangs.
// The pipeline's steps 1-6 are the functions under "The run", called in order by
// run_preprocess (step 1) and run_prepared (steps 2-6); each comment says which step it is.
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
#include <future>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>
#include <type_traits>
#include <vector>

#include "core/base/cpu.h"
#include "core/base/failpoint.h"
#include "core/base/format.h"
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

// A struct of int64_t counters only (each such struct static_asserts its size: no padding), as
// one MPI buffer of int64s: a struct takes one collective call.
template <class T>
constexpr int int64_fields() {
  static_assert(std::is_trivially_copyable_v<T> && std::is_standard_layout_v<T> &&
                    sizeof(T) % sizeof(int64_t) == 0 && alignof(T) == alignof(int64_t),
                "expected a struct of int64_t fields");
  return static_cast<int>(sizeof(T) / sizeof(int64_t));
}

// Every field summed over the ranks.
template <class T>
void sum_fields(const RankGroup& c, T& fields) {
  if (c.size == 1) return;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &fields, int64_fields<T>(), MPI_INT64_T, MPI_SUM, c.comm));
}

// Rank 0's fields on every rank.
template <class T>
void broadcast_fields(const RankGroup& c, T& fields) {
  if (c.size == 1) return;
  MPI_CHECK(MPI_Bcast(&fields, int64_fields<T>(), MPI_INT64_T, 0, c.comm));
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
  // Wall time spent encoding (BatchEncoder::seconds(); with more than one thread it overlaps
  // the writing and reading of the batches around it), for the final line.
  void add_encode_seconds(double s) { encode_seconds_ += s; }
  void print(bool final) {
    last_ = Clock::now();
    double dt = std::max(1e-9, std::chrono::duration<double>(last_ - t0_).count());
    double rate = bytes_ / dt;
    double eta = rate > 0 ? (total_ - bytes_) / rate : INFINITY;
    char buf[256];
    std::snprintf(buf, sizeof buf, "%.1f%%", total_ > 0 ? 100.0 * bytes_ / total_ : 100.0);
    log::info("tokenize", ranks_ > 1 ? " (rank 0's share)" : "", ": ", buf, " ",
              format_si(bytes_, "B"), " / ", format_si(total_, "B"), ", ", docs_, " docs, ", tokens_,
              " tokens | ", format_si(rate, "B"), "/s, ", static_cast<int64_t>(docs_ / dt),
              " docs/s, ", static_cast<int64_t>(tokens_ / dt), " tokens/s | ",
              final ? "done in " + format_duration(dt) : "ETA " + format_duration(eta),
              final && encode_seconds_ > 0 ? encoding_part() : std::string());
  }

 private:
  std::string encoding_part() const {
    char b[64];
    std::snprintf(b, sizeof b, "%.2f s", encode_seconds_);
    return " | encoding alone " + format_si(bytes_ / encode_seconds_, "B") + "/s (" + b + " of it)";
  }
  double encode_seconds_ = 0;
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

// ---- The run: what every step reads, then steps 1-6 in order. ----

// What every step reads: the options, the ranks, the output paths and the input files. Fixed
// once step 1 has listed the files; must not outlive the options.
struct Pipeline {
  const PreprocessOptions& opts;
  RankGroup ranks;
  fs::path out;                 // --output_dir
  std::string tmp_dir;          // out/.preprocess-tmp: each rank's tokenizer-training text
  bool train_tokenizer = true;  // no --tokenizer_path
  std::vector<TextFile> files;  // every rank's input files, in path order (step 1)
  int64_t input_bytes = 0;      // their total size (step 1)

  std::string model_path() const { return (out / "tokenizer.model").string(); }
};

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// The ranks of `comm` (one rank without it) and how many of them share this host. Collective.
RankGroup rank_group(const MpiComm* comm) {
  RankGroup g;
  if (!comm) return g;
  g.rank = comm->rank();
  g.size = comm->size();
  g.comm = comm->get();
  if (g.size > 1) {
    MPI_Comm local;
    MPI_CHECK(MPI_Comm_split_type(g.comm, MPI_COMM_TYPE_SHARED, g.rank, MPI_INFO_NULL, &local));
    MPI_CHECK(MPI_Comm_size(local, &g.local_size));
    MPI_CHECK(MPI_Comm_free(&local));
  }
  return g;
}

Pipeline make_pipeline(const PreprocessOptions& opts, const MpiComm* comm) {
  Pipeline p{opts, rank_group(comm), fs::path(opts.output_dir), "", true, {}, 0};
  p.tmp_dir = (p.out / ".preprocess-tmp").string();
  p.train_tokenizer = opts.tokenizer_path.empty();
  return p;
}

// 1. Options, input files (and their total size).
void check_options_and_list_inputs(Pipeline& p) {
  agreed(p.ranks, [&] {
    validate(p.opts);
    p.files = list_input_files(p.opts.input_dir);
    if (!p.train_tokenizer) {
      ANDY_CHECK_T(ConfigError, fs::is_regular_file(p.opts.tokenizer_path), "--tokenizer_path ",
                   p.opts.tokenizer_path,
                   ": no such file (expected an existing sentencepiece .model)");
    }
  });
  for (const auto& f : p.files) p.input_bytes += static_cast<int64_t>(f.bytes);
}

// 1. Output directory (rank 0, see prepare_output).
void prepare_output_dir(const Pipeline& p) {
  agreed(p.ranks, [&] {
    if (p.ranks.rank == 0) prepare_output(p.opts, p.tmp_dir);
  });
}

// Rank 0, after a failed run: removes what this run wrote, so a failed run leaves no half
// dataset behind and a rerun needs no --overwrite.
void remove_failed_run_output(const Pipeline& p, bool out_existed) {
  std::error_code ec;
  for (const char* d : {"train", "validation", ".preprocess-tmp", "manifest.json.tmp"})
    fs::remove_all(p.out / d, ec);
  if (p.train_tokenizer) {
    fs::remove(p.out / "tokenizer.model", ec);
    fs::remove(p.out / "tokenizer.vocab", ec);
  }
  if (!out_existed && fs::is_empty(p.out, ec)) fs::remove(p.out, ec);
}

void log_start(const Pipeline& p) {
  log::info("preprocess: ", p.files.size(), " input files, ",
            format_si(static_cast<double>(p.input_bytes), "B"), " in ", p.opts.input_dir, " -> ",
            p.opts.output_dir, " (", p.ranks.size, " rank", p.ranks.size > 1 ? "s" : "", ")");
}

// 2. This rank's files (largest first to the least-loaded rank: deterministic), in path order.
std::vector<size_t> files_of_this_rank(const std::vector<TextFile>& files, const RankGroup& ranks) {
  std::vector<size_t> order(files.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return files[a].bytes > files[b].bytes; });
  std::vector<uint64_t> load(ranks.size, 0);
  std::vector<int> owner(files.size());
  for (size_t i : order) {
    int r = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    owner[i] = r;
    load[r] += files[i].bytes + 1;
  }
  std::vector<size_t> mine;
  for (size_t i = 0; i < files.size(); ++i)
    if (owner[i] == ranks.rank) mine.push_back(i);
  return mine;
}

// Counters of step 3's read, summed over the ranks in one call (int64_t fields only).
struct ReadStats {
  int64_t invalid_utf8 = 0;     // invalid UTF-8 sequences replaced by U+FFFD
  int64_t skipped_lines = 0;    // malformed JSONL lines skipped
  int64_t empty_documents = 0;  // documents empty after normalization, dropped
  int64_t document_bytes = 0;   // bytes of the documents kept
};
static_assert(sizeof(ReadStats) == 4 * sizeof(int64_t), "ReadStats: int64_t fields only");

// Step 3's result, the same on every rank except my_document_bytes.
struct DocumentCounts {
  std::vector<int64_t> per_file;   // documents of each input file
  std::vector<int64_t> first_doc;  // global index of each file's first document; back(): all
  ReadStats read;                  // summed over the ranks
  int64_t my_document_bytes = 0;   // this rank's share of read.document_bytes

  int64_t documents() const { return first_doc.back(); }
};

std::string training_text_path(const Pipeline& p, int rank) {
  return p.tmp_dir + "/spm_input." + std::to_string(rank) + ".txt";
}

// Reads and normalizes this rank's files, counts their documents into doc_counts and, when a
// tokenizer is to be trained, writes their text to this rank's training file. Keeps nothing.
ReadStats read_my_files(const Pipeline& p, const std::vector<size_t>& mine,
                        std::vector<int64_t>& doc_counts) {
  ReadStats s;
  std::ofstream sp_in;
  const std::string sp_path = training_text_path(p, p.ranks.rank);
  if (p.train_tokenizer) {
    sp_in.open(sp_path, std::ios::binary);
    ANDY_CHECK_T(IoError, sp_in, sp_path, ": cannot create");
  }
  for (size_t i : mine) {
    FileDocuments fd = read_documents(p.files[i], p.opts.read);
    s.invalid_utf8 += fd.invalid_utf8;
    s.skipped_lines += fd.skipped_lines;
    s.empty_documents += fd.empty_docs;
    for (const auto& d : fd.docs) {
      s.document_bytes += static_cast<int64_t>(d.size());
      if (p.train_tokenizer) write_training_lines(sp_in, d);
    }
    doc_counts[i] = static_cast<int64_t>(fd.docs.size());
  }
  if (p.train_tokenizer) {
    sp_in.close();
    ANDY_CHECK_T(IoError, sp_in, sp_path, ": write failed (disk full?)");
  }
  return s;
}

// 3. Read and normalize, count documents, write tokenizer-training text. Nothing is kept:
//    step 5 reads each file again, so memory stays bounded by the largest file.
DocumentCounts count_documents(const Pipeline& p, const std::vector<size_t>& mine) {
  DocumentCounts c;
  c.per_file.assign(p.files.size(), 0);
  agreed(p.ranks, [&] { c.read = read_my_files(p, mine, c.per_file); });
  sum_i64(p.ranks, c.per_file);
  c.my_document_bytes = c.read.document_bytes;
  sum_fields(p.ranks, c.read);
  c.first_doc.assign(p.files.size() + 1, 0);
  for (size_t i = 0; i < p.files.size(); ++i) c.first_doc[i + 1] = c.first_doc[i] + c.per_file[i];
  return c;
}

// 3. The corpus has a document, and two when a validation split is asked for.
void check_corpus(const Pipeline& p, const DocumentCounts& c) {
  const int64_t n_docs = c.documents();
  agreed(p.ranks, [&] {
    ANDY_CHECK_T(ConfigError, n_docs > 0, "--input_dir ", p.opts.input_dir,
                 ": no readable text: ", p.files.size(), " files gave no non-empty document (",
                 c.read.empty_documents, " empty after normalization, ", c.read.skipped_lines,
                 " malformed JSONL lines skipped)");
    ANDY_CHECK_T(ConfigError, p.opts.val_fraction == 0 || n_docs >= 2, "--val_fraction ",
                 p.opts.val_fraction, ": the corpus has only ", n_docs,
                 " document, so it cannot be split by documents into train and validation (use "
                 "--val_fraction 0, "
                 "or --txt_docs blank_lines to split .txt files at blank lines)");
  });
}

void log_corpus(const DocumentCounts& c) {
  log::info("preprocess: ", c.documents(), " documents (", c.read.empty_documents,
            " empty dropped, ", c.read.invalid_utf8, " invalid UTF-8 sequences replaced, ",
            c.read.skipped_lines, " malformed JSONL lines skipped)");
}

// Rank 0: trains the tokenizer on every rank's training text.
void train_tokenizer_model(const Pipeline& p) {
  TokenizerTrainOptions t;
  for (int r = 0; r < p.ranks.size; ++r) t.input_files.push_back(training_text_path(p, r));
  t.model_prefix = (p.out / "tokenizer").string();
  t.vocab_size = p.opts.vocab_size > 0 ? p.opts.vocab_size : 32000;
  t.model_type = p.opts.model_type;
  t.character_coverage = p.opts.character_coverage;
  t.input_sentence_size = p.opts.tokenizer_sentences;
  t.num_threads = cores_available();
  t.seed = static_cast<uint32_t>(p.opts.seed);
  auto t0 = Clock::now();
  log::info("preprocess: training a ", p.opts.model_type, " sentencepiece tokenizer, vocab_size ",
            t.vocab_size);
  Tokenizer::train(t);
  log::info("preprocess: tokenizer trained in ", format_duration(seconds_since(t0)), " -> ",
            p.model_path());
}

// Rank 0: copies --tokenizer_path (and its .vocab, if any) into the output directory.
void copy_tokenizer_model(const Pipeline& p) {
  const std::string model_path = p.model_path();
  std::error_code ec;
  fs::copy_file(p.opts.tokenizer_path, model_path, fs::copy_options::overwrite_existing, ec);
  ANDY_CHECK_T(IoError, !ec, "--tokenizer_path ", p.opts.tokenizer_path, ": cannot copy to ",
               model_path, ": ", ec.message());
  std::string vocab = fs::path(p.opts.tokenizer_path).replace_extension(".vocab").string();
  if (fs::is_regular_file(vocab))
    fs::copy_file(vocab, (p.out / "tokenizer.vocab").string(), fs::copy_options::overwrite_existing,
                  ec);
}

// 4. Tokenizer: trained on rank 0 from every rank's text, or the given one copied in.
void train_or_copy_tokenizer(const Pipeline& p) {
  agreed(p.ranks, [&] {
    if (p.ranks.rank != 0) return;
    if (p.train_tokenizer)
      train_tokenizer_model(p);
    else if (!same_file(p.opts.tokenizer_path, p.model_path()))
      copy_tokenizer_model(p);
  });
}

// 4. Every rank loads the tokenizer; a given --vocab_size must match a given tokenizer.
Tokenizer load_tokenizer(const Pipeline& p) {
  Tokenizer tok;
  agreed(p.ranks, [&] { tok = Tokenizer::load(p.model_path()); });
  agreed(p.ranks, [&] {
    ANDY_CHECK_T(
        ConfigError,
        p.train_tokenizer || p.opts.vocab_size == 0 || p.opts.vocab_size == tok.vocab_size(),
        "--vocab_size ", p.opts.vocab_size, " differs from the vocabulary of --tokenizer_path ",
        p.opts.tokenizer_path, " (", tok.vocab_size(),
        "); drop --vocab_size or use the matching tokenizer");
  });
  return tok;
}

enum Split : int { kTrain = 0, kValidation = 1 };
constexpr const char* kSplitNames[2] = {"train", "validation"};

// The split of each document (data/preprocess.h): of n_docs documents, those whose position in
// a seeded permutation of the global document index is below n_validation go to validation.
class DocumentSplit {
 public:
  DocumentSplit(int64_t n_docs, double val_fraction, uint64_t seed)
      : n_validation_(val_fraction == 0 ? 0
                                        : std::clamp<int64_t>(std::llround(n_docs * val_fraction),
                                                              1, n_docs - 1)),
        perm_(static_cast<uint64_t>(n_docs), mix64(seed) ^ 0x5EEDULL) {}
  Split of(int64_t doc) const {
    return static_cast<int64_t>(perm_(static_cast<uint64_t>(doc))) < n_validation_ ? kValidation
                                                                                   : kTrain;
  }

 private:
  int64_t n_validation_;
  IndexPermutation perm_;
};

// --threads, or this host's cores shared among its ranks.
int tokenizer_threads(const PreprocessOptions& o, const RankGroup& ranks) {
  if (o.threads > cores_available() && ranks.rank == 0)
    log::warn("preprocess: --threads ", o.threads, " but this rank may only run on ", cores_available(),
              " core(s) (mpirun binds each rank to one core by default for up to 2 ranks): run mpirun with ",
              "--bind-to none or --map-by slot:PE=", o.threads);
  if (o.threads > 0) return o.threads;
  return default_threads_per_rank(ranks.local_size);
}

// Encodes a batch of documents on `threads` threads, the caller's among them. start() sets the
// other threads going at once, so that the caller can do its own work meanwhile (write the
// previous batch, read the next); finish() joins in on the documents left, waits for the
// others and returns the ids. Thread t encodes through caches_[t], kept across batches (the
// threads are new each batch), and the caches share their new words after each batch.
class BatchEncoder {
 public:
  BatchEncoder(const Tokenizer& tok, int threads) : tok_(tok), threads_(std::max(threads, 1)) {
    // 512 Ki words each (about 50 MB): a corpus's vocabulary of words, so the cache rarely
    // starts over.
    for (int t = 0; t < threads_; ++t) caches_.emplace_back(size_t{1} << 19);
  }
  BatchEncoder(const BatchEncoder&) = delete;
  BatchEncoder& operator=(const BatchEncoder&) = delete;
  ~BatchEncoder() { stop(); }
  // The threads take no more documents, and are joined (on an error elsewhere, before the
  // documents go away).
  void stop() {
    if (docs_) next_ = docs_->size();
    join();
  }

  // Starts encoding *docs, which must stay unchanged until finish().
  void start(const std::vector<std::string>* docs) {
    docs_ = docs;
    ids_.assign(docs->size(), {});
    next_ = 0;
    err_ = nullptr;
    t0_ = Clock::now();
    const int n = static_cast<int>(std::min<size_t>(threads_, docs->size()));
    for (int t = 1; t < n; ++t) pool_.emplace_back([this, t] { work(t); });
  }
  // Encodes what is left on this thread, waits for the others; rethrows a thread's error.
  std::vector<std::vector<int32_t>> finish() {
    if (pool_.empty()) t0_ = Clock::now();  // one thread: the encoding starts only now
    work(0);
    join();
    Tokenizer::share_words(caches_);
    seconds_ += std::chrono::duration<double>(Clock::now() - t0_).count();
    docs_ = nullptr;
    if (err_) std::rethrow_exception(err_);
    return std::move(ids_);
  }
  // Wall time from each start() to its finish() (from finish() on one thread), summed.
  double seconds() const { return seconds_; }

 private:
  void work(int t) {
    try {
      for (size_t d; (d = next_++) < docs_->size();) ids_[d] = tok_.encode((*docs_)[d], &caches_[t]);
    } catch (...) {
      std::lock_guard<std::mutex> l(err_mu_);
      err_ = std::current_exception();
    }
  }
  void join() {
    for (auto& th : pool_) th.join();
    pool_.clear();
  }

  const Tokenizer& tok_;
  const int threads_;
  std::vector<Tokenizer::WordCache> caches_;
  std::vector<std::thread> pool_;
  const std::vector<std::string>* docs_ = nullptr;
  std::vector<std::vector<int32_t>> ids_;
  std::atomic<size_t> next_{0};
  std::exception_ptr err_;
  std::mutex err_mu_;
  Clock::time_point t0_;
  double seconds_ = 0;
};

// This rank's open shard of each split, <split>/shard-<rank>-<index>.h5. A shard is closed and
// listed when the next document would take it past --shard_tokens: documents are never split.
// With `background`, a full shard is written out (HDF5, rename, checksum) on a thread of its own
// while the next one fills; finish() waits for them. Not thread-safe.
class ShardSink {
 public:
  ShardSink(const Pipeline& p, const Tokenizer& tok, bool background)
      : p_(p), tok_(tok), background_(background) {
    options_.chunk_tokens = p.opts.chunk_tokens;
    options_.compression = p.opts.compression;
  }
  void add(Split s, const std::vector<int32_t>& ids) {
    writer_for(s, static_cast<int64_t>(ids.size())).add_document(ids.data(), ids.size());
  }
  // Closes the open shards (train first); returns every shard written, in the order they were
  // closed, as manifest entries with their "split". Rethrows a background write's error.
  nlohmann::json finish() {
    close(kTrain);
    close(kValidation);
    nlohmann::json shards = nlohmann::json::array();
    for (Closing& c : closing_) {
      take(c);
      const ShardSummary& sum = c.written;
      shards.push_back({{"split", kSplitNames[c.split]},
                        {"file", fs::relative(sum.path, p_.out).string()},
                        {"tokens", sum.tokens},
                        {"documents", sum.documents},
                        {"checksum", sum.checksum}});
    }
    closing_.clear();
    return shards;
  }

 private:
  struct Closing {
    Split split;
    std::future<ShardSummary> summary;  // std::async's: an async one's destructor waits for the write
    bool taken = false;
    ShardSummary written;  // once taken
  };
  // The write's summary, or its error (thrown here).
  static void take(Closing& c) {
    if (c.taken) return;
    c.taken = true;
    c.written = c.summary.get();
  }

  ShardWriter& writer_for(Split s, int64_t n_tokens) {
    if (writers_[s] && writers_[s]->tokens() > 0 &&
        writers_[s]->tokens() + n_tokens > p_.opts.shard_tokens)
      close(s);
    if (!writers_[s]) {
      char name[64];
      std::snprintf(name, sizeof name, "shard-%05d-%05d.h5", p_.ranks.rank, shard_index_[s]++);
      writers_[s] = std::make_unique<ShardWriter>((p_.out / kSplitNames[s] / name).string(),
                                                  kSplitNames[s], tok_.vocab_size(),
                                                  tok_.checksum(), tok_.eos_id(), options_);
    }
    return *writers_[s];
  }
  void close(Split s) {
    if (!writers_[s] || writers_[s]->documents() == 0) return;
    // A background write that failed (a full disk) ends the run now, not at the end.
    for (Closing& c : closing_)
      if (!c.taken && c.summary.wait_for(std::chrono::seconds(0)) == std::future_status::ready) take(c);
    std::shared_ptr<ShardWriter> w(std::move(writers_[s]));
    auto write = [w] { return w->finish(); };
    closing_.push_back({s, std::async(background_ ? std::launch::async : std::launch::deferred, write), false, {}});
    if (!background_) take(closing_.back());  // written here and now
  }

  const Pipeline& p_;
  const Tokenizer& tok_;
  const bool background_;
  ShardWriteOptions options_;
  std::unique_ptr<ShardWriter> writers_[2];
  int shard_index_[2] = {0, 0};
  std::vector<Closing> closing_;
};

// Step 5 on one rank, inside one agreed() call: reads the rank's files again and encodes them
// batch by batch, adding every document, eos appended, to its split's shard. A pipeline: while
// the other threads encode batch k, this one writes batch k - 1 and reads batch k + 1, then
// helps encode what is left of batch k; full shards go to disk on a thread of their own. With
// one thread the same steps run one after another on it.
class ShardWriting {
 public:
  ShardWriting(const Pipeline& p, const Tokenizer& tok, const DocumentCounts& counts,
               const DocumentSplit& split, int threads)
      : p_(p),
        counts_(counts),
        split_(split),
        eos_(tok.eos_id()),
        encoder_(tok, threads),
        sink_(p, tok, threads > 1),
        progress_(counts.my_document_bytes, p.ranks.size),
        reread_(p.opts.read) {
    reread_.log_problems = false;  // step 3 reported them
  }
  // Writes the files `mine` (indices into p.files); returns this rank's shards (ShardSink).
  nlohmann::json run(const std::vector<size_t>& mine) {
    mine_ = &mine;
    Batch cur = next_batch(), prev;
    struct StopOnError {  // destroyed before cur, whose documents the threads may be reading
      BatchEncoder& e;
      ~StopOnError() { e.stop(); }
    } stop_on_error{encoder_};
    while (!cur.docs.empty()) {
      encoder_.start(&cur.docs);
      write(prev);
      if (failpoint_fires("preprocess.read"))  // a read failing while the other threads encode
        throw IoError("failpoint preprocess.read");
      Batch next = next_batch();
      cur.ids = encoder_.finish();
      prev = std::move(cur);
      cur = std::move(next);
    }
    write(prev);
    progress_.add_encode_seconds(encoder_.seconds());
    nlohmann::json shards = sink_.finish();
    progress_.print(true);
    return shards;
  }

 private:
  // Documents encoded together (on the threads) between two writes and progress updates. A
  // batch takes documents across files: a corpus of one document per file (the demo's) gave
  // the threads one document at a time before, so --threads 2 barely helped.
  static constexpr size_t kBatch = 512;
  static constexpr int64_t kBatchBytes = 8 << 20;

  struct Batch {
    std::vector<std::string> docs;
    std::vector<int64_t> index;  // their global document indices
    int64_t bytes = 0;
    std::vector<std::vector<int32_t>> ids;
  };

  // The next batch of documents in order, reading files as needed; empty at the end.
  Batch next_batch() {
    Batch b;
    while (b.docs.size() < kBatch && b.bytes < kBatchBytes) {
      if (file_doc_ == file_docs_.size()) {
        if (next_file_ == mine_->size()) break;
        const size_t fi = (*mine_)[next_file_++];
        file_docs_ = read_documents(p_.files[fi], reread_).docs;
        ANDY_CHECK_T(IoError, static_cast<int64_t>(file_docs_.size()) == counts_.per_file[fi],
                     p_.files[fi].path, ": changed while preprocessing (", counts_.per_file[fi],
                     " documents, now ", file_docs_.size(), ")");
        file_doc_ = 0;
        file_first_ = counts_.first_doc[fi];
        continue;
      }
      b.bytes += static_cast<int64_t>(file_docs_[file_doc_].size());
      b.index.push_back(file_first_ + static_cast<int64_t>(file_doc_));
      b.docs.push_back(std::move(file_docs_[file_doc_++]));
    }
    return b;
  }
  // Adds an encoded batch's documents in order (eos appended) to their split's shard.
  void write(Batch& b) {
    if (b.docs.empty()) return;
    int64_t tokens = 0;
    for (size_t d = 0; d < b.docs.size(); ++d) {
      auto& v = b.ids[d];
      v.push_back(eos_);
      sink_.add(split_.of(b.index[d]), v);
      tokens += static_cast<int64_t>(v.size());
    }
    progress_.add(b.bytes, static_cast<int64_t>(b.docs.size()), tokens);
    b = Batch();
  }

  const Pipeline& p_;
  const DocumentCounts& counts_;
  const DocumentSplit& split_;
  const int32_t eos_;
  BatchEncoder encoder_;
  ShardSink sink_;
  Progress progress_;
  ReadOptions reread_;
  const std::vector<size_t>* mine_ = nullptr;
  size_t next_file_ = 0;                   // the next of mine_ to read
  std::vector<std::string> file_docs_;     // the file being taken into batches
  size_t file_doc_ = 0;                    // its next document
  int64_t file_first_ = 0;                 // its first document's global index
};

// 5. Tokenize (threads) and write this rank's shards; returns them (ShardSink::finish).
nlohmann::json tokenize_and_write_shards(const Pipeline& p, const Tokenizer& tok,
                                         const DocumentCounts& counts,
                                         const std::vector<size_t>& mine) {
  const DocumentSplit split(counts.documents(), p.opts.val_fraction, p.opts.seed);
  const int threads = tokenizer_threads(p.opts, p.ranks);
  nlohmann::json my_shards = nlohmann::json::array();
  agreed(p.ranks, [&] { my_shards = ShardWriting(p, tok, counts, split, threads).run(mine); });
  return my_shards;
}

// Per split: documents, tokens and shards written by every rank (int64_t fields only).
struct SplitTotals {
  int64_t documents = 0, tokens = 0, shards = 0;
};
struct DatasetTotals {
  SplitTotals train, validation;
};
static_assert(sizeof(DatasetTotals) == 6 * sizeof(int64_t), "DatasetTotals: int64_t fields only");

// Rank 0: every rank's shard list (ShardSink::finish, as JSON text) merged into the manifest's
// "splits": per split its documents, tokens and shards sorted by file.
nlohmann::json merge_shard_lists(const std::vector<std::string>& lists) {
  nlohmann::json splits = {
      {"train", {{"documents", 0}, {"tokens", 0}, {"shards", nlohmann::json::array()}}},
      {"validation", {{"documents", 0}, {"tokens", 0}, {"shards", nlohmann::json::array()}}}};
  for (const auto& s : lists) {
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
  return splits;
}

nlohmann::json manifest_json(const Pipeline& p, const Tokenizer& tok, const DocumentCounts& c,
                             const nlohmann::json& splits) {
  return {
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
      {"seed", p.opts.seed},
      {"val_fraction", p.opts.val_fraction},
      {"ranks", p.ranks.size},
      {"input",
       {{"dir", p.opts.input_dir},
        {"files", static_cast<int64_t>(p.files.size())},
        {"bytes", p.input_bytes},
        {"documents", c.documents()},
        {"invalid_utf8_replaced", c.read.invalid_utf8},
        {"malformed_jsonl_skipped", c.read.skipped_lines},
        {"empty_documents_dropped", c.read.empty_documents}}},
      {"splits", splits},
  };
}

// Writes out/manifest.json under a temporary name, then renames it into place.
void write_manifest_file(const fs::path& out, const nlohmann::json& m) {
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
}

SplitTotals split_totals(const nlohmann::json& split) {
  return {split["documents"].get<int64_t>(), split["tokens"].get<int64_t>(),
          static_cast<int64_t>(split["shards"].size())};
}

// 6. Manifest (rank 0), written last under a temporary name; every rank gets rank 0's totals.
DatasetTotals write_manifest(const Pipeline& p, const Tokenizer& tok, const DocumentCounts& c,
                             const nlohmann::json& my_shards) {
  auto all = gather_strings(p.ranks, my_shards.dump());
  DatasetTotals totals;
  agreed(p.ranks, [&] {
    if (p.ranks.rank != 0) return;
    nlohmann::json splits = merge_shard_lists(all);
    nlohmann::json m = manifest_json(p, tok, c, splits);
    ANDY_CHECK_T(ConfigError, splits["train"]["tokens"].get<int64_t>() > 0,
                 "preprocess produced no training tokens");
    write_manifest_file(p.out, m);
    std::error_code ec;
    fs::remove_all(p.tmp_dir, ec);
    totals = {split_totals(splits["train"]), split_totals(splits["validation"])};
  });
  broadcast_fields(p.ranks, totals);
  return totals;
}

PreprocessResult result_of(const Pipeline& p, const DocumentCounts& c, const Tokenizer& tok,
                           const DatasetTotals& totals, Clock::time_point t_start) {
  PreprocessResult res;
  res.files = static_cast<int64_t>(p.files.size());
  res.bytes = p.input_bytes;
  res.documents = c.documents();
  res.invalid_utf8 = c.read.invalid_utf8;
  res.skipped_lines = c.read.skipped_lines;
  res.empty_documents = c.read.empty_documents;
  res.vocab_size = tok.vocab_size();
  res.tokenizer_path = p.model_path();
  res.tokenizer_checksum = tok.checksum();
  res.train_documents = totals.train.documents;
  res.train_tokens = totals.train.tokens;
  res.train_shards = totals.train.shards;
  res.validation_documents = totals.validation.documents;
  res.validation_tokens = totals.validation.tokens;
  res.validation_shards = totals.validation.shards;
  res.manifest_path = (p.out / "manifest.json").string();
  res.seconds = seconds_since(t_start);
  return res;
}

void log_done(const PreprocessResult& res) {
  log::info("preprocess: done in ", format_duration(res.seconds), ": train ", res.train_documents,
            " docs, ", res.train_tokens, " tokens in ", res.train_shards, " shards; validation ",
            res.validation_documents, " docs, ", res.validation_tokens, " tokens in ",
            res.validation_shards, " shards; vocab ", res.vocab_size, " -> ", res.manifest_path);
}

// Steps 2-6, after step 1 (run_preprocess) checked the options, listed the input files and
// prepared the output directory.
PreprocessResult run_prepared(const Pipeline& p, Clock::time_point t_start) {
  log_start(p);
  const std::vector<size_t> mine = files_of_this_rank(p.files, p.ranks);
  const DocumentCounts counts = count_documents(p, mine);
  check_corpus(p, counts);
  log_corpus(counts);
  train_or_copy_tokenizer(p);
  const Tokenizer tok = load_tokenizer(p);
  const nlohmann::json my_shards = tokenize_and_write_shards(p, tok, counts, mine);
  const DatasetTotals totals = write_manifest(p, tok, counts, my_shards);
  PreprocessResult res = result_of(p, counts, tok, totals, t_start);
  log_done(res);
  return res;
}

}  // namespace

PreprocessResult run_preprocess(const PreprocessOptions& opts, const MpiComm* comm) {
  const auto t_start = Clock::now();
  Pipeline p = make_pipeline(opts, comm);
  check_options_and_list_inputs(p);
  const bool out_existed = fs::exists(p.out);
  prepare_output_dir(p);
  try {
    return run_prepared(p, t_start);
  } catch (...) {
    // Every rank is here (agreed()): rank 0 cleans up.
    if (p.ranks.rank == 0) remove_failed_run_output(p, out_existed);
    throw;
  }
}

}  // namespace andy::data
