// `andyllm train`: loads and validates the run config on every rank, builds the rank grid and
// the Trainer (launch/trainer.h), writes the effective config into the output directory and
// runs. A setup failure on any rank is agreed: reported once, same exit code everywhere.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>

#include "core/base/logging.h"
#include "core/base/torch_compat.h"
#include "core/model/model_stats.h"
#include "launch/checkpoint.h"
#include "launch/commands.h"
#include "launch/trainer.h"
#include "parallel/mpi_utils.h"
#include "parallel/process_grid.h"
#include "parallel/world.h"

namespace andy {

Subcommand make_train_command() {
  Subcommand c;
  c.name = "train";
  c.summary = "data x tensor parallel training from a TOML run config";
  c.usage =
      "usage: mpirun -np N andyllm train --config configs/tiny.toml [--set section.key=value ...]\n"
      "  world size N = parallel.tensor_parallel_size x data-parallel size";
  c.flags = config_flags();
  c.flags.push_back({"resume", "auto|none|PATH", "resume from the latest checkpoint (auto), none, or a step directory (sets checkpoint.resume)"});
  c.needs_mpi = true;
  c.run = [](const ParsedArgs& args, World* world) {
    // From the start: a stop request during setup is honoured at the first step boundary
    // instead of killing the rank (SIGUSR1's default action).
    install_stop_signal_handlers();
    reject_positional(args, "train");
    ParsedArgs a = args;
    if (args.has("resume")) a.append("set", "checkpoint.resume=" + args.get("resume"));
    Config cfg = load_config_collectively(a, world);
    if (handle_config_info_flags(a, cfg, model_summary(cfg))) return 0;
    configure_threads(cfg, world);
    const GridOptions g = grid_options_from(cfg, cfg.train.device, "[train] device",
                                            static_cast<int>(cfg.parallel.tensor_parallel_size), world);
    ProcessGrid grid(*world, g);
    // Setup can fail on some ranks only (a shard one rank cannot read, an output_dir only rank 0
    // creates): the ranks agree, so the job ends with one message and one exit code, writing
    // nothing, instead of MPI_Abort. The Trainer constructor runs no collectives.
    MPI_Comm agree_comm = world->comm().get();
    // Another live run in output_dir is refused first, naming it (rank 0 holds the lock).
    run_agreed(agree_comm, [&] {
      if (world->is_root()) lock_output_dir(cfg, /*create=*/false);
    });
    std::unique_ptr<Trainer> trainer;
    run_agreed(agree_comm, [&] { trainer = std::make_unique<Trainer>(cfg, TrainGrid::from(grid, g.device)); });
    run_agreed(agree_comm, [&] {
      if (!world->is_root()) return;
      std::error_code ec;
      std::filesystem::create_directories(cfg.train.output_dir, ec);
      ANDY_CHECK_T(IoError, !ec, "[train] output_dir = ", cfg.train.output_dir, " (",
                   cfg.origin_of("train.output_dir"), "): cannot create it: ", ec.message());
      lock_output_dir(cfg, /*create=*/true);
      std::string cleared = clear_earlier_run(cfg, trainer->resume_dir());
      if (!cleared.empty()) log::info(cleared);
      std::string path = cfg.train.output_dir + "/config.toml";
      std::ofstream f(path);
      f << config_to_toml(cfg);
      f.flush();
      ANDY_CHECK_T(IoError, f.good(), "[train] output_dir = ", cfg.train.output_dir, ": cannot write ", path);
      log::info("effective config written to ", path);
    });
    TrainResult r = trainer->run();
    if (world->is_root()) {
      if (!r.sample.empty()) std::printf("\n--- sample from the trained model ---\n%s\n---\n", r.sample.c_str());
      std::string first_val = r.val_losses.empty() ? "n/a" : std::to_string(r.val_losses.front().second);
      std::string last_val = r.val_losses.empty() ? "n/a" : std::to_string(r.val_losses.back().second);
      log::info(r.stopped_by_signal ? "stopped on request" : "training finished", " at step ", r.final_step,
                " in ", r.seconds, " s; val_loss ", first_val, " -> ", last_val);
      const bool best = std::filesystem::exists(cfg.train.output_dir + "/best_model/model.pt");
      log::info("written under ", cfg.train.output_dir, ": config.toml, metrics.jsonl (plot: scripts/plot_metrics.sh ",
                cfg.train.output_dir, "/metrics.jsonl), ", best ? "best_model/, " : "", "checkpoints/ (latest: ",
                r.last_checkpoint.empty() ? "none" : r.last_checkpoint, ")");
    }
    return 0;
  };
  return c;
}

}  // namespace andy
