// The data layer under mpirun (2 and 4 ranks): DP ranks together serve every window of an
// epoch exactly once, TP peers get identical batches, preprocessing split over ranks gives the
// same documents and the same train/validation split as one process, and a bad input on one
// rank's file stops every rank with the same message.
#include <gtest/gtest.h>
#include <mpi.h>

#include <set>

#include "core/base/error.h"
#include "data/loader.h"
#include "data/preprocess.h"
#include "data/text_input.h"
#include "parallel/mpi_utils.h"
#include "parallel/process_grid.h"
#include "tests/data/data_test_util.h"

using andy::data::testing::error_of;

using namespace andy;
using namespace andy::data;
using namespace andy::data::testing;

namespace {

int rank() {
  int r;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int size() {
  int s;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// A directory made by rank 0, known to all; removed by rank 0 at the end.
class SharedDir {
 public:
  SharedDir() {
    std::string p;
    if (rank() == 0) {
      dir_ = std::make_unique<TempDir>("andyllm-mpi");
      p = dir_->path();
    }
    int n = static_cast<int>(p.size());
    MPI_Bcast(&n, 1, MPI_INT, 0, MPI_COMM_WORLD);
    p.resize(n);
    MPI_Bcast(p.data(), n, MPI_CHAR, 0, MPI_COMM_WORLD);
    path_ = p;
  }
  ~SharedDir() { MPI_Barrier(MPI_COMM_WORLD); }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::unique_ptr<TempDir> dir_;
  std::string path_;
};

LoaderOptions options(const std::string& split, int dp_rank, int dp_size) {
  LoaderOptions o;
  o.split = split;
  o.seq_len = 8;
  o.batch_size = 3;
  o.dp_rank = dp_rank;
  o.dp_size = dp_size;
  o.seed = 11;
  o.expected_vocab_size = kVocab;
  o.tokenizer_checksum = kChecksum;
  return o;
}

}  // namespace

TEST(DataMpi, DataParallelRanksCoverTheEpochWithoutDuplicates) {
  SharedDir dir;
  if (rank() == 0) make_split(dir / "", "train", {500, 461});  // W = 120; G = 3 x {2, 4} divides it
  MPI_Barrier(MPI_COMM_WORLD);
  DataLoader l(options(dir / "train", rank(), size()));
  std::vector<int64_t> mine;
  for (int64_t s = 0; s < l.steps_per_epoch(); ++s) {
    Batch b = l.next_batch();
    mine.insert(mine.end(), b.windows.begin(), b.windows.end());
  }
  int n = static_cast<int>(mine.size());
  std::vector<int> counts(size()), displs(size());
  MPI_Gather(&n, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::vector<int64_t> all;
  if (rank() == 0) {
    int total = 0;
    for (int r = 0; r < size(); ++r) {
      displs[r] = total;
      total += counts[r];
    }
    all.resize(total);
  }
  MPI_Gatherv(mine.data(), n, MPI_INT64_T, all.data(), counts.data(), displs.data(), MPI_INT64_T, 0,
              MPI_COMM_WORLD);
  if (rank() == 0) {
    std::set<int64_t> unique(all.begin(), all.end());
    EXPECT_EQ(all.size(), 120u);
    EXPECT_EQ(unique.size(), all.size()) << "a window was served to two ranks";
    EXPECT_EQ(unique.size(), 120u);
    EXPECT_EQ(*unique.rbegin(), 119);
  }
}

TEST(DataMpi, TensorParallelPeersSeeIdenticalBatches) {
  SharedDir dir;
  if (rank() == 0) make_split(dir / "", "train", {3000});
  MPI_Barrier(MPI_COMM_WORLD);
  const int tp = 2;
  GridCoords c = grid_coords(rank(), size(), tp);
  DataLoader l(options(dir / "train", c.dp_rank, size() / tp));
  std::vector<int64_t> sig;  // windows + a checksum of the tokens of 6 batches
  for (int s = 0; s < 6; ++s) {
    Batch b = l.next_batch();
    sig.insert(sig.end(), b.windows.begin(), b.windows.end());
    sig.push_back(
        (b.input * torch::arange(1, 25, torch::kInt64).view({3, 8})).sum().item<int64_t>());
  }
  std::vector<int64_t> all(sig.size() * size());
  MPI_Allgather(sig.data(), static_cast<int>(sig.size()), MPI_INT64_T, all.data(),
                static_cast<int>(sig.size()), MPI_INT64_T, MPI_COMM_WORLD);
  for (int r = 0; r < size(); ++r) {
    std::vector<int64_t> other(all.begin() + r * sig.size(), all.begin() + (r + 1) * sig.size());
    if (grid_coords(r, size(), tp).dp_rank == c.dp_rank) {
      EXPECT_EQ(other, sig) << "TP peer rank " << r << " got different batches";
    } else {
      EXPECT_NE(other, sig) << "rank " << r << " of another DP group got the same batches";
    }
  }
}

TEST(DataMpi, PreprocessAcrossRanksMatchesOneProcess) {
  SharedDir dir;
  std::vector<std::string> expected;
  for (int i = 0; i < 80; ++i) expected.push_back(normalize_document(corpus_doc(i)));
  if (rank() == 0) {
    for (int f = 0; f < 8; ++f) {
      std::string txt;
      for (int i = f; i < 80; i += 8) txt += corpus_doc(i) + "\n\n";
      write_file(dir / ("raw/part" + std::to_string(f) + ".txt"), txt);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  PreprocessOptions o;
  o.input_dir = dir / "raw";
  o.output_dir = dir / "multi";
  o.vocab_size = 600;
  o.val_fraction = 0.25;
  o.shard_tokens = 2000;
  o.read.txt_mode = TxtMode::kBlankLines;
  o.threads = 1;
  MpiComm world(MPI_COMM_WORLD, false);
  PreprocessResult r = run_preprocess(o, &world);
  EXPECT_EQ(r.documents, 80);
  EXPECT_EQ(r.validation_documents, 20);
  EXPECT_EQ(r.train_documents, 60);
  if (rank() == 0) {
    // Every rank wrote shards of its own.
    for (int k = 0; k < size(); ++k) {
      char name[64];
      std::snprintf(name, sizeof name, "multi/train/shard-%05d-00000.h5", k);
      EXPECT_TRUE(std::filesystem::exists(dir / name)) << name;
    }
    o.output_dir = dir / "single";
    o.tokenizer_path = dir / "multi/tokenizer.model";
    o.vocab_size = 0;
    run_preprocess(o, nullptr);
    Tokenizer tok = Tokenizer::load(dir / "multi/tokenizer.model");
    auto mt = decode_split(dir / "multi/train", tok),
         mv = decode_split(dir / "multi/validation", tok);
    auto st = decode_split(dir / "single/train", tok),
         sv = decode_split(dir / "single/validation", tok);
    EXPECT_EQ(std::multiset<std::string>(mt.begin(), mt.end()),
              std::multiset<std::string>(st.begin(), st.end()));
    EXPECT_EQ(std::multiset<std::string>(mv.begin(), mv.end()),
              std::multiset<std::string>(sv.begin(), sv.end()));
    std::multiset<std::string> all(mt.begin(), mt.end());
    all.insert(mv.begin(), mv.end());
    EXPECT_EQ(all, std::multiset<std::string>(expected.begin(), expected.end()));
  }
}

TEST(DataMpi, ABadFileOnOneRankStopsEveryRankWithItsMessage) {
  SharedDir dir;
  if (rank() == 0) {
    for (int f = 0; f < 6; ++f) {
      std::string jsonl;
      for (int i = f; i < 60; i += 6)
        jsonl += nlohmann::json{{"text", corpus_doc(i)}}.dump() + "\n";
      if (f == 4) jsonl += "{\"text\": oops}\n";
      write_file(dir / ("raw/p" + std::to_string(f) + ".jsonl"), jsonl);
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  PreprocessOptions o;
  o.input_dir = dir / "raw";
  o.output_dir = dir / "out";
  o.vocab_size = 600;
  MpiComm world(MPI_COMM_WORLD, false);
  std::string m = error_of([&] { run_preprocess(o, &world); });
  EXPECT_NE(m.find("p4.jsonl:11: malformed JSONL line: not valid JSON"), std::string::npos) << m;
  MPI_Barrier(MPI_COMM_WORLD);
  if (rank() == 0) {
    EXPECT_FALSE(std::filesystem::exists(dir / "out/manifest.json"));
  }
}
