// Subcommands whose engines land in later milestones: their flags are described, and running
// them says plainly that the feature is not available yet (exit code 3).
#include <cstdio>

#include "launch/commands.h"

namespace andy {

namespace {
Subcommand not_yet(const std::string& name, const std::string& summary, const std::string& usage,
                   std::vector<Flag> flags) {
  Subcommand c;
  c.name = name;
  c.summary = summary;
  c.usage = usage;
  c.flags = std::move(flags);
  c.run = [name](const ParsedArgs&, World*) {
    std::fprintf(stderr, "andyllm %s: not yet available in this build (see the open issues)\n",
                 name.c_str());
    return 3;
  };
  return c;
}
}  // namespace

Subcommand make_quantize_command() {
  return not_yet("quantize", "int8 weight quantization of a checkpoint for CPU serving",
                 "usage: andyllm quantize --input DIR --output DIR",
                 {{"input", "DIR", "checkpoint directory"}, {"output", "DIR", "quantized checkpoint"}});
}

Subcommand make_export_command() {
  return not_yet("export", "export a checkpoint to Hugging Face (vLLM) or GGUF (llama.cpp)",
                 "usage: andyllm export --input DIR --format hf|gguf --output PATH",
                 {{"input", "DIR", "checkpoint directory"},
                  {"format", "hf|gguf", "output format"},
                  {"output", "PATH", "output directory (hf) or file (gguf)"}});
}

}  // namespace andy
