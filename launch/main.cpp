// andyllm: the one executable. Dispatches to a subcommand, initialises MPI for those that need
// it, and is the top-level error handler: an andy::Error is logged with its rank, then a
// multi-rank job is ended with MPI_Abort so no rank waits forever for a dead peer.
#include <malloc.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "core/base/error.h"
#include "core/base/logging.h"
#include "launch/commands.h"
#include "parallel/world.h"

using namespace andy;

namespace {

std::vector<Subcommand> all_commands() {
  return {make_train_command(),    make_serve_command(),  make_generate_command(), make_preprocess_command(),
          make_quantize_command(), make_export_command(), make_eval_command(), make_bench_command(),
          make_version_command()};
}

void print_main_help(const std::vector<Subcommand>& cmds) {
  std::printf(
      "AndyLLM %s: train and serve LLaMA-style models across many GPUs (or CPU ranks).\n\n"
      "usage: [mpirun -np N] andyllm SUBCOMMAND [flags]\n\nsubcommands:\n",
      ANDYLLM_VERSION);
  for (const auto& c : cmds) std::printf("  %-12s %s\n", c.name.c_str(), c.summary.c_str());
  std::printf("\n'andyllm SUBCOMMAND --help' describes every flag of a subcommand.\n");
}

// glibc malloc hands freed memory at the top of the heap back to the kernel once it passes the
// trim threshold (dynamic: twice the largest freed mmap chunk). A training step frees and
// re-allocates the same activations every step, so the pages were faulted in and zeroed again
// each time: 15% of a CPU step was in the kernel's page-fault path (perf, configs/tiny.toml).
// A fixed 32 MiB mmap threshold (glibc's maximum) and 256 MiB trim threshold keep them:
// 131 -> 110 ms per step on one rank (docs/PERFORMANCE.md). ANDYLLM_MALLOC_TUNING=0 turns it
// off; MALLOC_* environment variables set by the user win.
void tune_malloc() {
  const char* opt = std::getenv("ANDYLLM_MALLOC_TUNING");
  if (opt && std::strcmp(opt, "0") == 0) return;
  if (!std::getenv("MALLOC_MMAP_THRESHOLD_")) mallopt(M_MMAP_THRESHOLD, 32 << 20);
  if (!std::getenv("MALLOC_TRIM_THRESHOLD_")) mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

// Logs and ends the job: exit code for a single process, MPI_Abort for several.
int fail(const World* world, int code, const std::string& msg) {
  if (!msg.empty()) log::error(msg);
  if (world && world->size() > 1) {
    World::abort(code);
  }
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  tune_malloc();
  auto cmds = all_commands();
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") ||
      !std::strcmp(argv[1], "help")) {
    print_main_help(cmds);
    return argc < 2 ? 1 : 0;
  }
  if (!std::strcmp(argv[1], "--version")) argv[1] = const_cast<char*>("version");
  const Subcommand* cmd = nullptr;
  for (const auto& c : cmds)
    if (c.name == argv[1]) cmd = &c;
  if (!cmd) {
    std::vector<std::string> names;
    for (const auto& c : cmds) names.push_back(c.name);
    std::string hint = did_you_mean(argv[1], names);
    std::fprintf(stderr, "andyllm: unknown subcommand '%s'%s; see 'andyllm --help'\n", argv[1],
                 hint.empty() ? "" : (" (did you mean '" + hint + "'?)").c_str());
    return 2;
  }

  ParsedArgs args;
  try {
    args = parse_flags(cmd->name, cmd->flags, argc, argv, 2);
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
  if (args.has("help")) {
    std::printf("%s\n%s\nflags:\n%s", cmd->usage.c_str(), cmd->summary.c_str(),
                format_flags_help(cmd->flags).c_str());
    return 0;
  }

  std::unique_ptr<World> world;
  try {
    if (cmd->needs_mpi) world = std::make_unique<World>(&argc, &argv);
    int rc = cmd->run(args, world.get());
    return rc;
  } catch (const AgreedFailure& e) {
    // Every rank saw it (the ranks agreed on it): a clean exit, reported once, no MPI_Abort.
    if (e.report() && *e.message()) log::error(e.message());
    return e.exit_code();
  } catch (const ConfigError& e) {
    return fail(world.get(), 2, e.what());
  } catch (const Error& e) {
    return fail(world.get(), 1, e.what());
  } catch (const std::exception& e) {
    return fail(world.get(), 1, std::string("unexpected error: ") + e.what());
  }
}
