// The safetensors reader and writer (see safetensors.h for the layout).
#include "core/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/base/durable_fs.h"
#include "core/base/error.h"

namespace andy {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Header lengths beyond this are not a safetensors file (the Rust reader's own limit: 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";

const std::vector<std::pair<std::string, at::ScalarType>>& dtype_table() {
  static const std::vector<std::pair<std::string, at::ScalarType>> t = {
      {"F32", at::kFloat}, {"BF16", at::kBFloat16}, {"F16", at::kHalf},  {"F64", at::kDouble},
      {"I8", at::kChar},   {"U8", at::kByte},       {"I16", at::kShort}, {"I32", at::kInt},
      {"I64", at::kLong},  {"BOOL", at::kBool}};
  return t;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

}  // namespace

at::ScalarType safetensors_dtype(const std::string& name, const std::string& file) {
  for (const auto& [n, t] : dtype_table())
    if (n == name) return t;
  ANDY_THROW(IoError, "safetensors file ", file, ": dtype '", name,
             "' is not supported (expected F32, BF16, F16, F64, I8, U8, I16, I32, I64 or BOOL)");
}

std::string safetensors_dtype_name(at::ScalarType t) {
  for (const auto& [n, s] : dtype_table())
    if (s == t) return n;
  ANDY_THROW(Error, "safetensors: no dtype name for ", c10::toString(t));
}

struct SafetensorsFile::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && addr != MAP_FAILED) ::munmap(addr, size);
  }
};

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  ANDY_CHECK_T(IoError, fd >= 0, "safetensors file ", path, " cannot be opened: ", std::strerror(errno));
  struct stat st {};
  const int rc = ::fstat(fd, &st);
  const size_t size = rc == 0 ? static_cast<size_t>(st.st_size) : 0;
  f.map_ = std::make_shared<Mapping>();
  if (size > 0) {
    // Private and writable: a tensor viewing it may be written by mistake without a fault, and
    // the file never changes.
    f.map_->addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    f.map_->size = size;
  }
  ::close(fd);
  ANDY_CHECK_T(IoError, size >= 8 && f.map_->addr != MAP_FAILED, "safetensors file ", path,
               size < 8 ? " is too short to be one (truncated?)" : " cannot be mapped");
  const auto* bytes = static_cast<const uint8_t*>(f.map_->addr);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  ANDY_CHECK_T(IoError, header_len <= kMaxHeaderBytes && 8 + header_len <= size, "safetensors file ",
               path, ": header length ", header_len, " does not fit in the file's ", size,
               " bytes (truncated, or not a safetensors file)");
  f.data_ = bytes + 8 + header_len;
  const uint64_t data_bytes = size - 8 - header_len;
  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(bytes + 8),
                         reinterpret_cast<const char*>(bytes + 8 + header_len));
  } catch (const std::exception& e) {
    ANDY_THROW(IoError, "safetensors file ", path, ": its header is not JSON (", e.what(), ")");
  }
  ANDY_CHECK_T(IoError, header.is_object(), "safetensors file ", path, ": its header is not a JSON object");
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const auto& [name, v] : header.items()) {
    if (name == "__metadata__") {
      if (v.is_object())
        for (const auto& [k, m] : v.items())
          if (m.is_string()) f.metadata_[k] = m.get<std::string>();
      continue;
    }
    SafetensorsEntry e;
    try {
      e.dtype = v.at("dtype").get<std::string>();
      e.shape = v.at("shape").get<std::vector<int64_t>>();
      auto off = v.at("data_offsets").get<std::vector<uint64_t>>();
      ANDY_CHECK_T(IoError, off.size() == 2, "data_offsets must have two entries");
      e.begin = off[0];
      e.end = off[1];
    } catch (const IoError& err) {
      ANDY_THROW(IoError, "safetensors file ", path, ": tensor '", name, "': ", err.what());
    } catch (const std::exception& err) {
      ANDY_THROW(IoError, "safetensors file ", path, ": tensor '", name,
                 "' lacks dtype, shape or data_offsets (", err.what(), ")");
    }
    const at::ScalarType t = safetensors_dtype(e.dtype, path);
    const uint64_t expected = static_cast<uint64_t>(numel_of(e.shape)) * c10::elementSize(t);
    ANDY_CHECK_T(IoError, e.begin <= e.end && e.end <= data_bytes && e.end - e.begin == expected,
                 "safetensors file ", path, ": tensor '", name, "' spans bytes [", e.begin, ", ",
                 e.end, ") but its ", e.dtype, " shape ", at::IntArrayRef(e.shape), " needs ", expected,
                 " and the data holds ", data_bytes, " (truncated or damaged)");
    spans.emplace_back(e.begin, e.end);
    f.entries_.emplace(name, std::move(e));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    ANDY_CHECK_T(IoError, spans[i].first >= spans[i - 1].second, "safetensors file ", path,
                 ": two tensors overlap at byte ", spans[i].first, " (damaged)");
  return f;
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  auto it = entries_.find(name);
  ANDY_CHECK_T(IoError, it != entries_.end(), "safetensors file ", path_, ": tensor '", name, "' is missing");
  const SafetensorsEntry& e = it->second;
  const at::ScalarType t = safetensors_dtype(e.dtype, path_);
  if (e.end == e.begin) return at::empty(e.shape, at::TensorOptions().dtype(t));
  auto keep = map_;
  return at::from_blob(const_cast<uint8_t*>(data_ + e.begin), e.shape, [keep](void*) {},
                       at::TensorOptions().dtype(t));
}

bool has_safetensors(const std::string& dir) {
  return fs::exists(fs::path(dir) / kSingleFile) || fs::exists(fs::path(dir) / kIndexFile);
}

std::map<std::string, at::Tensor> read_safetensors_dir(const std::string& dir) {
  std::map<std::string, at::Tensor> out;
  const std::string index = (fs::path(dir) / kIndexFile).string();
  if (fs::exists(index)) {
    std::map<std::string, std::string> weight_map;
    try {
      weight_map = json::parse(read_text_file(index)).at("weight_map").get<std::map<std::string, std::string>>();
    } catch (const std::exception& e) {
      ANDY_THROW(IoError, "safetensors index ", index, " is damaged (a weight_map of tensor -> file expected): ", e.what());
    }
    std::map<std::string, std::vector<std::string>> names_by_file;
    for (const auto& [name, file] : weight_map) names_by_file[file].push_back(name);
    for (const auto& [file, names] : names_by_file) {
      ANDY_CHECK_T(IoError, file.find('/') == std::string::npos, "safetensors index ", index,
                   ": file '", file, "' is not a file name in the same directory");
      SafetensorsFile f = SafetensorsFile::open((fs::path(dir) / file).string());
      for (const std::string& name : names) out[name] = f.tensor(name);
    }
    return out;
  }
  SafetensorsFile f = SafetensorsFile::open((fs::path(dir) / kSingleFile).string());
  for (const auto& [name, e] : f.entries()) out[name] = f.tensor(name);
  return out;
}

void write_safetensors(const NamedTensors& tensors, const std::string& file,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    ANDY_CHECK(!header.contains(name), "write_safetensors: tensor '", name, "' given twice");
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    header[name] = {{"dtype", safetensors_dtype_name(t.scalar_type())},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  DurableWriter out(file);
  out.write(len, sizeof len);
  out.write(text);
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach().cpu().contiguous();
    out.write(c.data_ptr(), static_cast<size_t>(c.numel()) * c.element_size());
  }
  out.finish();
}

std::vector<std::string> write_safetensors_dir(const NamedTensors& tensors, const std::string& dir,
                                               uint64_t max_shard_bytes) {
  std::vector<NamedTensors> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const auto& nt : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(nt.second.numel()) * nt.second.element_size();
    if (in_shard > 0 && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(nt);
    in_shard += bytes;
    total += bytes;
  }
  if (shards.size() == 1) {
    write_safetensors(tensors, (fs::path(dir) / kSingleFile).string());
    return {kSingleFile};
  }
  std::vector<std::string> files;
  json weight_map = json::object();
  for (size_t k = 0; k < shards.size(); ++k) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", k + 1, shards.size());
    write_safetensors(shards[k], (fs::path(dir) / name).string());
    for (const auto& nt : shards[k]) weight_map[nt.first] = name;
    files.push_back(name);
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_file_durable((fs::path(dir) / kIndexFile).string(), index.dump(2) + "\n");
  files.push_back(kIndexFile);
  return files;
}

}  // namespace andy
