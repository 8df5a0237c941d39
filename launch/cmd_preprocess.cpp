// `andyllm preprocess`: raw text (.txt / .jsonl, any language) to a sentencepiece tokenizer and
// sharded HDF5 token datasets (engine: data/preprocess.h). Runs as one process or under
// mpirun, where the input files are split over ranks; a failure on any rank is reported once
// and every rank exits with the same code.
#include <cstdio>

#include "core/base/logging.h"
#include "data/preprocess.h"
#include "launch/commands.h"
#include "parallel/world.h"

namespace andy {

namespace {

int run_preprocess_command(const ParsedArgs& args, World* world) {
  data::PreprocessOptions o;
  o.input_dir = args.get("input_dir");
  o.output_dir = args.get("output_dir");
  if (!args.has("input_dir")) throw ConfigError("andyllm preprocess: --input_dir DIR is required");
  if (!args.has("output_dir"))
    throw ConfigError("andyllm preprocess: --output_dir DIR is required");
  o.vocab_size = static_cast<int>(args.get_int("vocab_size", 0));
  o.model_type = args.get("model_type", o.model_type);
  o.tokenizer_path = args.get("tokenizer_path", "");
  o.character_coverage = args.get_double("character_coverage", o.character_coverage);
  o.tokenizer_sentences = args.get_int("tokenizer_sentences", o.tokenizer_sentences);
  o.val_fraction = args.get_double("val_fraction", o.val_fraction);
  o.seed = static_cast<uint64_t>(args.get_int("seed", static_cast<int64_t>(o.seed)));
  o.shard_tokens = args.get_int("shard_tokens", o.shard_tokens);
  o.chunk_tokens = args.get_int("chunk_tokens", o.chunk_tokens);
  o.compression = static_cast<int>(args.get_int("compression", o.compression));
  o.threads = static_cast<int>(args.get_int("threads", 0));
  o.overwrite = args.has("overwrite") && args.get("overwrite") != "false";
  std::string txt = args.get("txt_docs", "file");
  if (txt == "file")
    o.read.txt_mode = data::TxtMode::kWholeFile;
  else if (txt == "blank_lines")
    o.read.txt_mode = data::TxtMode::kBlankLines;
  else
    throw ConfigError("--txt_docs " + txt + ": expected file or blank_lines");
  o.read.jsonl_field = args.get("jsonl_field", o.read.jsonl_field);
  std::string bad = args.get("bad_jsonl", "fail");
  if (bad == "fail")
    o.read.bad_jsonl = data::BadLinePolicy::kFail;
  else if (bad == "skip")
    o.read.bad_jsonl = data::BadLinePolicy::kSkip;
  else
    throw ConfigError("--bad_jsonl " + bad + ": expected fail or skip");

  // With several ranks run_preprocess throws an agreed error (Agreed<E>) on every rank: main
  // reports it once and every rank exits with the same code.
  data::run_preprocess(o, world ? &world->comm() : nullptr);
  return 0;
}

}  // namespace

Subcommand make_preprocess_command() {
  Subcommand c;
  c.name = "preprocess";
  c.summary = "train a sentencepiece tokenizer and write sharded HDF5 token datasets";
  c.usage =
      "usage: [mpirun -np N] andyllm preprocess --input_dir DIR --output_dir DIR [--vocab_size N]\n"
      "  writes DIR/tokenizer.model, DIR/train/*.h5, DIR/validation/*.h5 and DIR/manifest.json "
      "(docs/DATA.md)";
  c.flags = {
      {"input_dir", "DIR", "directory of UTF-8 .txt / .jsonl files, read recursively (required)"},
      {"output_dir", "DIR",
       "where tokenizer.model, train/, validation/ and manifest.json go (required)"},
      {"vocab_size", "N", "sentencepiece vocabulary size (default 32000)"},
      {"model_type", "bpe|unigram", "sentencepiece model type (default bpe)"},
      {"tokenizer_path", "FILE", "use this existing sentencepiece .model instead of training one"},
      {"character_coverage", "F",
       "characters covered by pieces, the rest by byte fallback (default 0.9995)"},
      {"tokenizer_sentences", "N", "sentences sampled for tokenizer training (default 2000000)"},
      {"val_fraction", "F", "fraction of documents held out for validation (default 0.05)"},
      {"seed", "N", "seed of the validation split and tokenizer sampling (default 1234)"},
      {"shard_tokens", "N", "tokens per shard; documents are never split (default 33554432)"},
      {"chunk_tokens", "N", "HDF5 chunk length in tokens (default 65536)"},
      {"compression", "0-9", "gzip level for token chunks, 0 = none (default 0)"},
      {"txt_docs", "file|blank_lines",
       ".txt documents: whole file (default) or blocks between blank lines"},
      {"jsonl_field", "NAME", "JSONL field holding the text (default text)"},
      {"bad_jsonl", "fail|skip", "malformed JSONL line: fail (default) or skip with a warning"},
      {"threads", "N", "tokenizer threads per rank (default: cores / ranks on the host)"},
      {"overwrite", "", "replace the dataset in a non-empty --output_dir"},
  };
  c.needs_mpi = true;
  c.run = run_preprocess_command;
  return c;
}

}  // namespace andy
