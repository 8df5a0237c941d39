// `andyllm preprocess`: raw text to tokenizer + HDF5 shards (engine lands with the data layer).
#include <cstdio>

#include "launch/commands.h"

namespace andy {

Subcommand make_preprocess_command() {
  Subcommand c;
  c.name = "preprocess";
  c.summary = "train a sentencepiece tokenizer and write sharded HDF5 token datasets";
  c.usage = "usage: [mpirun -np N] andyllm preprocess --input_dir DIR --output_dir DIR [--vocab_size N]";
  c.flags = {{"input_dir", "DIR", "directory of .txt / .jsonl files, read recursively"},
             {"output_dir", "DIR", "where tokenizer.model, train/, validation/ and manifest.json go"},
             {"vocab_size", "N", "sentencepiece vocabulary size"}};
  c.run = [](const ParsedArgs&, World*) {
    std::fprintf(stderr, "andyllm preprocess: not yet available in this build\n");
    return 3;
  };
  return c;
}

}  // namespace andy
