// Training checkpoints: output_dir/checkpoints/step_NNNNNNNN/ holding
//   model_tpRR.safetensors  one per TP rank, written by DP rank 0 of that TP rank: the rank's
//                   parameter shards (as stored: the vocabulary padded), so a reader of the
//                   weights alone (serving, export: core/model/weights_io.h) maps them and never
//                   reads the optimizer state
//   shard_tpRR.pt   the same rank's AdamW moments (exp_avg/NAME, exp_avg_sq/NAME), optimizer step
//                   count and loss scaler (format 2 and older: the parameter shards too)
//   rng.pt          every rank's CPU generator state ([world, bytes] uint8), from rank 0
//   meta.json       format_version 3, step, optimizer steps, tp/dp sizes, batch sizes, data
//                   cursor (epoch and windows consumed in the epoch), best validation loss, the
//                   effective config, every file's FNV-1a 64 checksum
// A save writes step_N.tmp/, waits until every rank has finished (barrier), renames it to
// step_N/ and only then replaces the `latest` file (write + rename, atomic). Older step
// directories beyond checkpoint.keep_last are removed: only steps older than the one just
// written, so neither it (what `latest` names) nor a later step left by a run resumed from an
// older checkpoint is ever pruned. Files and directories are fsynced before the renames that
// publish them. A failed save (any rank) throws IoError on
// every rank, removes its step_N.tmp/ and never touches a complete checkpoint; saving a step
// that already has one moves the old one aside until the new one is recorded as latest.
// Resume: the data cursor is stored in windows (sequences) of the epoch, so a different DP size
// (or batch size) resumes at the same point of the data order (rounded down to a whole global
// batch of the new layout: a few windows may be served twice). A different TP size merges the
// old shards and splits them for the new size (parallel/tp_partition.h).
// A missing shard, a tensor of the wrong shape, a missing entry or a truncated file is refused
// with an IoError naming the file. All functions are collective over the trainer's world.
#pragma once

#include <string>
#include <vector>

#include "launch/trainer.h"

namespace andy {

// "step_00000042"
std::string checkpoint_dir_name(int64_t step);
// Saves the trainer's state at its current step; returns the step directory.
std::string save_checkpoint(Trainer& trainer);
// The checkpoint checkpoint.resume selects: "" for none (resume = none, or auto without a
// complete checkpoint in output_dir/checkpoints).
std::string resolve_resume_path(const Config& cfg);
// Setup-time check of the checkpoint to resume (before anything is written): meta.json readable,
// the same [model], the files this rank will read present and matching their recorded
// checksums. ConfigError (bad input, exit 2) naming the file otherwise. No collectives.
void check_resume_checkpoint(const Config& cfg, const std::string& dir, int tp_rank, int tp_size);
// Restores weights, optimizer, scaler, step, best val loss, RNG and data cursor.
void load_checkpoint(Trainer& trainer, const std::string& dir);

// An earlier run in output_dir: "3 checkpoint(s) step_.. .. step_.. and best_model/ (val_loss
// X)", or "" when there is none. A fresh run (nothing to resume) over one is refused by
// check_fresh_start (ConfigError saying how to proceed) unless checkpoint.existing is archive
// or replace, which clear_earlier_run carries out (rank 0; returns what it did, "" if nothing).
std::string earlier_run_contents(const Config& cfg);
void check_fresh_start(const Config& cfg, const std::string& resume_dir);
std::string clear_earlier_run(const Config& cfg, const std::string& resume_dir);
// Steps of the complete checkpoints under `root` (directories step_N, no suffix), ascending.
std::vector<int64_t> complete_checkpoint_steps(const std::string& root);
// Takes an advisory lock (flock on OUTPUT_DIR/.lock, released by the OS when the process
// ends, so a killed run never leaves it held) for the rest of the process. A directory another
// live run holds is refused with a ConfigError naming that run's host and PID. `create`: make
// the directory if missing; otherwise a missing directory returns false (nothing to lock yet).
// Rank 0 only.
bool lock_output_dir(const Config& cfg, bool create);
// The validation loss recorded with output_dir/best_model (NaN when none or unknown).
double best_model_val_loss(const std::string& output_dir);

// "KIND: cannot write PATH: REASON (N MiB free on MOUNT)" for a failed write (LibTorch reports a
// full disk only as a failed write, so the free space is added).
std::string describe_write_failure(const std::string& what_kind, const std::string& path,
                                   const std::exception& e, const std::string& verb = "cannot write");

// agree_on_error (parallel/agreement.h) over the world: every rank throws Agreed<IoError> with
// the lowest failing rank's message when any `local_error` is non-empty; world rank 0 then
// removes `partial_dir` (if given) so nothing half-written stays. Collective.
void agree_or_throw(const TrainGrid& g, const std::string& local_error, at::Device device,
                    const std::string& partial_dir = "");

}  // namespace andy
