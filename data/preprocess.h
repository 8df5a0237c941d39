// The preprocessing pipeline behind `andyllm preprocess`: raw text -> sentencepiece tokenizer
// -> tokenized documents -> train/ and validation/ HDF5 shards + manifest.json.
//
// Output directory layout:
//   tokenizer.model, tokenizer.vocab     trained here, or copied from --tokenizer_path
//   train/shard-RRRRR-NNNNN.h5           shards of rank RRRRR (data/shard.h)
//   validation/shard-RRRRR-NNNNN.h5
//   manifest.json                        written last: its presence means the run completed
//
// Distribution: with several MPI ranks each rank reads, tokenizes and writes the shards of
// its share of the input files (balanced by size); rank 0 trains the tokenizer from every
// rank's text and writes the manifest. Tokenization uses `threads` threads per rank.
// The validation split is chosen by document: of N documents, k = round(N * val_fraction)
// (at least 1 when val_fraction > 0) go to validation, picked by a seeded permutation of the
// global document index (files in path order, documents in file order), so the split does not
// depend on the number of ranks or threads.
// Memory: each input file is read twice (count + tokenizer text, then tokenize + write) and
// never kept, so a rank holds one file's documents and one shard (shard_tokens x 4 bytes).
#pragma once

#include <cstdint>
#include <string>

#include "data/text_input.h"

namespace andy {
class MpiComm;
}

namespace andy::data {

struct PreprocessOptions {
  std::string input_dir;
  std::string output_dir;
  int vocab_size = 0;  // 0: 32000 when training; with tokenizer_path it must match if set
  std::string model_type = "bpe";  // bpe (default) or unigram
  std::string tokenizer_path;      // existing .model: no training. Default: train one
  double character_coverage = 0.9995;
  int64_t tokenizer_sentences = 2000000;  // sentences sampled for tokenizer training
  double val_fraction = 0.05;             // Default: 0.05 of the documents
  uint64_t seed = 1234;
  int64_t shard_tokens = int64_t{1}
                         << 25;  // tokens per shard (documents are never split). Default: 32 Mi
  int64_t chunk_tokens = 65536;  // HDF5 chunk length
  int compression = 0;           // gzip level 0..9. Default: 0 (fastest random reads)
  ReadOptions read;              // .txt splitting, JSONL field, bad-line policy
  bool overwrite = false;        // replace an existing output directory's dataset
  int threads = 0;               // tokenizer threads per rank; 0: cores / ranks on the host
};

struct PreprocessResult {
  int64_t files = 0, bytes = 0, documents = 0;
  int64_t train_documents = 0, validation_documents = 0;
  int64_t train_tokens = 0, validation_tokens = 0;
  int64_t train_shards = 0, validation_shards = 0;
  int64_t invalid_utf8 = 0, skipped_lines = 0, empty_documents = 0;
  int vocab_size = 0;
  std::string tokenizer_path, tokenizer_checksum, manifest_path;
  double seconds = 0;
};

// Runs the pipeline; collective over `comm` when it is given (every rank of it must call it;
// launch/ passes the World's communicator).
// Throws ConfigError for bad input or options (the message names the file, line or flag),
// IoError for file-system failures. On failure no manifest.json is written.
PreprocessResult run_preprocess(const PreprocessOptions& opts, const MpiComm* comm = nullptr);

}  // namespace andy::data
