// Model weights on disk, below both serving and the trainer's checkpoints: where a model's
// weights and saved config are, and each tensor-parallel rank's slices of them.
//
// Layouts read (LibTorch archives with keys = Hugging Face tensor names with "." as "/", or
// safetensors):
//   best_model/              model.pt (full, unsharded tensors) + config.toml (+ meta.json)
//   best_model/model.pt      the same, named by its file (config.toml beside it)
//   checkpoints/step_N/      per TP rank of the run that wrote it: model_tpRR.safetensors
//                            (its weight shards, mapped: only the weights are read, never the
//                            AdamW moments in shard_tpRR.pt; format 2 and older kept both in
//                            shard_tpRR.pt) + meta.json (tp_size, the saved config)
//   int8_dir/                the best_model layout with int8 linear weights and
//                            quantization.json (core/model/int8_weights.h)
//   hf_dir/                  config.json + model.safetensors (or shards + index), as
//                            transformers writes them (core/model/hf_checkpoint.h); float32,
//                            bfloat16 or float16, loaded as float32. Its tokenizer.model, when
//                            present, is the model's tokenizer.
// A rank reads only what it needs where the layout allows: a checkpoint written at the same
// TP size gives each rank its own shard file; otherwise the shards are merged and re-split
// (parallel/tp_partition.h). The partition comes from the model's own specs
// (llama_partition_specs), so loading cannot drift from the layers.
// Every failure is an IoError (files) or ConfigError (the user's choice of path / TP size)
// naming the path and what was expected.
//
//   ModelSource src = resolve_model_source("outputs/tiny/best_model");
//   StateDict mine = load_model_shard(src, tp_rank, tp_size);   // this rank's slices
#pragma once

#include <string>

#include <torch/serialize.h>

#include "core/config/config.h"
#include "parallel/tp_partition.h"

namespace andy {

// "shard_tp03.pt": TP rank 3's optimizer file in a training checkpoint step directory (its
// weights too in checkpoints of format 2 and older).
std::string checkpoint_shard_file(int tp_rank);
// "model_tp03.safetensors": TP rank 3's weights in a checkpoint of format 3.
std::string checkpoint_weights_file(int tp_rank);
// "model.layers.0.mlp.up_proj.weight" -> "model/layers/0/mlp/up_proj/weight" (archive keys).
std::string archive_key(const std::string& tensor_name);

// Opens a LibTorch archive; IoError "WHAT FILE is missing / cannot be read (truncated or
// damaged)" otherwise (`what`: "model weights", "checkpoint file").
torch::serialize::InputArchive open_archive(const std::string& file, const std::string& what);

// Every tensor of the model `m` describes, in Hugging Face's order (embeddings, layers in
// order, final norm, lm_head when untied), with its full (unpadded) shape.
std::vector<std::pair<std::string, std::vector<int64_t>>> model_tensor_shapes(const ModelConfig& m);

// Tensor `name` of an open archive; IoError "WHAT FILE: tensor 'NAME' is missing" otherwise.
at::Tensor read_archive_tensor(torch::serialize::InputArchive& ar, const std::string& file, const std::string& name,
                               const std::string& what);

// The weights named in `expected` (name -> shape as stored, checked; an empty shape is not
// checked) of TP rank `tp_rank`'s shard of checkpoint step directory `dir`, as stored (the
// vocabulary padded): views on its mapped model_tpRR.safetensors (format 3: the optimizer file
// is never opened), else read from shard_tpRR.pt (format 2 and older). IoError naming the file
// and the tensor. Serving reads checkpoints through it; the trainer's resume reads the weights
// through it too and the optimizer state on top.
StateDict read_checkpoint_weights(const std::string& dir, int tp_rank,
                                  const std::map<std::string, std::vector<int64_t>>& expected);

struct ModelSource {
  enum class Kind { kFullWeights, kCheckpoint, kHuggingFace };
  Kind kind = Kind::kFullWeights;
  std::string path;          // as the user gave it
  std::string weights_file;  // kFullWeights: model.pt
  std::string dir;           // the directory holding config / shards
  std::string config_file;   // where `config` was read from (config.json for kHuggingFace)
  Config config;             // [model] and [data] of the saved config (defaults elsewhere)
  int saved_tp = 1;          // kCheckpoint: TP size of the run that wrote it
  bool int8 = false;         // kFullWeights written by `andyllm quantize` (int8_weights.h):
                             // linear weights int8 plus their NAME_scale
};

// Finds the weights and the saved config of `path`; throws with a message saying what was
// looked for when it is neither layout.
ModelSource resolve_model_source(const std::string& path);

// This rank's slices of every tensor of the model described by src.config, for `tp_size`
// ranks (ConfigError when tp_size does not divide the heads). Shapes are checked against the
// config: a tensor missing or of another shape names the file and both shapes.
StateDict load_model_shard(const ModelSource& src, int tp_rank, int tp_size);

// Every tensor of the model, whole and unpadded (Hugging Face shapes; an int8 model's int8
// weights and scales as stored): for export and quantization.
StateDict load_full_state_dict(const ModelSource& src);

// Writes full (unsharded) tensors as one LibTorch archive and fsyncs it.
void write_full_weights(const StateDict& full, const std::string& file);

// Writes a LibTorch archive to `file` through our own file descriptor, then fsyncs it. A failed
// write (a full disk) throws IoError naming the file, the reason and the free space; unlike
// OutputArchive::save_to(path), whose writer throws again from its destructor and terminates
// the process. A partial file is removed. Returns the file's FNV-1a 64 checksum
// ("fnv1a64:<16 hex>", data/checksum.h's format), computed while writing.
std::string save_archive(torch::serialize::OutputArchive& archive, const std::string& file);

}  // namespace andy
