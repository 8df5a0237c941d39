// The safetensors format (Hugging Face's, what transformers and vLLM load), read and written by
// our own code: an 8-byte little-endian header length N, N bytes of JSON
//   {"__metadata__": {"format": "pt"}, "NAME": {"dtype": "F32", "shape": [..],
//    "data_offsets": [BEGIN, END]}, ...}
// padded with spaces to a multiple of 8, then the tensors' bytes, contiguous and in offset
// order (offsets are relative to the end of the header). Little-endian, row-major.
// A model too large for one file is split into model-0000K-of-0000N.safetensors plus
// model.safetensors.index.json ({"metadata": {"total_size": BYTES}, "weight_map": {NAME: FILE}}).
//
// Reading maps the file (read-only, private): a tensor is a view on the mapping that keeps it
// alive, so a rank that takes a slice of it reads only those pages.
//
//   SafetensorsFile f = SafetensorsFile::open("hf/model.safetensors");
//   at::Tensor w = f.tensor("model.norm.weight");              // dtype as stored
//   write_safetensors_dir(tensors, "out/", 5'000'000'000);      // one file or shards + index
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace andy {

// "F32" <-> at::kFloat, "BF16", "F16", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL".
// Unknown names / types throw IoError / Error naming them.
at::ScalarType safetensors_dtype(const std::string& name, const std::string& file);
std::string safetensors_dtype_name(at::ScalarType t);

struct SafetensorsEntry {
  std::string dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets after the header
};

// One .safetensors file, mapped. Movable; tensors taken from it stay valid after it is gone.
class SafetensorsFile {
 public:
  // IoError naming the file when it is missing, shorter than its header says, or its header is
  // not the format (bad JSON, offsets out of range or overlapping, a shape that does not match
  // the byte count, an unknown dtype).
  static SafetensorsFile open(const std::string& path);

  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) > 0; }
  // A CPU tensor viewing the mapping, in the stored dtype (IoError when `name` is absent).
  at::Tensor tensor(const std::string& name) const;

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> map_;
  const uint8_t* data_ = nullptr;  // first byte after the header
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Every tensor of a directory's model.safetensors, or of the shards its
// model.safetensors.index.json lists, by name (views on the mappings).
std::map<std::string, at::Tensor> read_safetensors_dir(const std::string& dir);
// True when `dir` holds model.safetensors or model.safetensors.index.json.
bool has_safetensors(const std::string& dir);

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Writes `tensors` (CPU, any layout; written row-major in the order given) as one safetensors
// file, fsynced. IoError naming the file and the free space on a failed write; the partial
// file is removed.
void write_safetensors(const NamedTensors& tensors, const std::string& file,
                       const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

// Writes the tensors into `dir` (which exists) as model.safetensors when their bytes fit in
// `max_shard_bytes`, else as model-0000K-of-0000N.safetensors shards (tensors kept whole, in
// order, a new shard begun when the next tensor would overflow) plus
// model.safetensors.index.json. Returns the files written (names within dir).
std::vector<std::string> write_safetensors_dir(const NamedTensors& tensors, const std::string& dir,
                                               uint64_t max_shard_bytes);

}  // namespace andy
