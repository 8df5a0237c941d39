// HDF5 shard writer and reader (layout in data/shard.h).
#include "data/shard.h"

#include <cstdio>
#include <filesystem>

#include "data/checksum.h"

namespace fs = std::filesystem;

namespace andy::data {

namespace {

void write_attr_i64(hid_t loc, const char* name, int64_t v, const std::string& file) {
  H5Handle space(H5_CHECK(H5Screate(H5S_SCALAR), file, ": attribute ", name), H5Sclose);
  H5Handle a(H5_CHECK(H5Acreate2(loc, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                      file, ": create attribute ", name),
             H5Aclose);
  H5_CHECK(H5Awrite(a.get(), H5T_NATIVE_INT64, &v), file, ": write attribute ", name);
}

void write_attr_str(hid_t loc, const char* name, const std::string& v, const std::string& file) {
  H5Handle type(H5_CHECK(H5Tcopy(H5T_C_S1), file, ": string type"), H5Tclose);
  H5_CHECK(H5Tset_size(type.get(), std::max<size_t>(1, v.size())), file, ": string size");
  H5_CHECK(H5Tset_strpad(type.get(), H5T_STR_NULLPAD), file, ": string pad");
  H5Handle space(H5_CHECK(H5Screate(H5S_SCALAR), file, ": attribute ", name), H5Sclose);
  H5Handle a(H5_CHECK(H5Acreate2(loc, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                      file, ": create attribute ", name),
             H5Aclose);
  std::string padded = v.empty() ? std::string(1, '\0') : v;
  H5_CHECK(H5Awrite(a.get(), type.get(), padded.data()), file, ": write attribute ", name);
}

int64_t read_attr_i64(hid_t loc, const char* name, const std::string& file) {
  ANDY_CHECK_T(IoError, H5Aexists(loc, name) > 0, file, ": not an AndyLLM token shard (attribute '",
               name, "' missing)");
  H5Handle a(H5_CHECK(H5Aopen(loc, name, H5P_DEFAULT), file, ": open attribute ", name), H5Aclose);
  int64_t v = 0;
  H5_CHECK(H5Aread(a.get(), H5T_NATIVE_INT64, &v), file, ": read attribute ", name);
  return v;
}

std::string read_attr_str(hid_t loc, const char* name, const std::string& file) {
  ANDY_CHECK_T(IoError, H5Aexists(loc, name) > 0, file, ": not an AndyLLM token shard (attribute '",
               name, "' missing)");
  H5Handle a(H5_CHECK(H5Aopen(loc, name, H5P_DEFAULT), file, ": open attribute ", name), H5Aclose);
  H5Handle type(H5_CHECK(H5Aget_type(a.get()), file, ": attribute type ", name), H5Tclose);
  ANDY_CHECK_T(IoError, H5Tget_class(type.get()) == H5T_STRING && !H5Tis_variable_str(type.get()),
               file, ": attribute ", name, " is not a fixed-length string");
  size_t n = H5Tget_size(type.get());
  std::string s(n, '\0');
  H5_CHECK(H5Aread(a.get(), type.get(), s.data()), file, ": read attribute ", name);
  size_t z = s.find('\0');
  if (z != std::string::npos) s.resize(z);
  return s;
}

void write_dataset(hid_t file, const char* name, hid_t file_type, hid_t mem_type, const void* data,
                   hsize_t n, const ShardWriteOptions& o, const std::string& path) {
  H5Handle space(H5_CHECK(H5Screate_simple(1, &n, nullptr), path, ": dataspace ", name), H5Sclose);
  H5Handle dcpl(H5_CHECK(H5Pcreate(H5P_DATASET_CREATE), path, ": dcpl"), H5Pclose);
  hsize_t chunk = std::max<hsize_t>(1, std::min<hsize_t>(n, static_cast<hsize_t>(o.chunk_tokens)));
  if (n > 0) {
    H5_CHECK(H5Pset_chunk(dcpl.get(), 1, &chunk), path, ": chunking ", name);
    if (o.compression > 0) {
      H5_CHECK(H5Pset_shuffle(dcpl.get()), path, ": shuffle filter");
      H5_CHECK(H5Pset_deflate(dcpl.get(), static_cast<unsigned>(o.compression)), path,
               ": gzip filter");
    }
  }
  H5Handle ds(
      H5_CHECK(H5Dcreate2(file, name, file_type, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
               path, ": create dataset ", name),
      H5Dclose);
  if (n > 0)
    H5_CHECK(H5Dwrite(ds.get(), mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, data), path, ": write ",
             name);
}

}  // namespace

ShardWriter::ShardWriter(std::string path, std::string split, int64_t vocab_size,
                         std::string tokenizer_checksum, int64_t eos_id, ShardWriteOptions opts)
    : path_(std::move(path)),
      split_(std::move(split)),
      checksum_(std::move(tokenizer_checksum)),
      vocab_size_(vocab_size),
      eos_id_(eos_id),
      opts_(opts) {
  ANDY_CHECK_T(ConfigError, opts_.compression >= 0 && opts_.compression <= 9, "--compression ",
               opts_.compression, ": expected a gzip level 0..9");
  ANDY_CHECK_T(ConfigError, opts_.chunk_tokens >= 1, "--chunk_tokens ", opts_.chunk_tokens,
               ": expected >= 1");
}

void ShardWriter::add_document(const int32_t* ids, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    ANDY_CHECK(ids[i] >= 0 && ids[i] < vocab_size_, path_, ": token id ", ids[i],
               " outside the vocabulary [0, ", vocab_size_, ")");
    tokens_.push_back(static_cast<uint32_t>(ids[i]));
  }
  offsets_.push_back(static_cast<int64_t>(tokens_.size()));
}

ShardSummary ShardWriter::finish() {
  std::string tmp = path_ + ".tmp";
  {
    std::lock_guard<std::recursive_mutex> lock(hdf5_mutex());
    hdf5_quiet();
    H5Handle f(H5_CHECK(H5Fcreate(tmp.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), tmp,
                        ": cannot create"),
               H5Fclose);
    hsize_t n = tokens_.size();
    if (vocab_size_ <= 65536) {
      std::vector<uint16_t> t16(tokens_.begin(), tokens_.end());
      write_dataset(f.get(), "tokens", H5T_STD_U16LE, H5T_NATIVE_UINT16, t16.data(), n, opts_, tmp);
    } else {
      write_dataset(f.get(), "tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, tokens_.data(), n, opts_,
                    tmp);
    }
    ShardWriteOptions plain;
    plain.chunk_tokens = opts_.chunk_tokens;
    write_dataset(f.get(), "doc_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, offsets_.data(),
                  offsets_.size(), plain, tmp);
    write_attr_i64(f.get(), "format_version", kShardFormatVersion, tmp);
    write_attr_i64(f.get(), "vocab_size", vocab_size_, tmp);
    write_attr_str(f.get(), "tokenizer_checksum", checksum_, tmp);
    write_attr_i64(f.get(), "token_count", tokens(), tmp);
    write_attr_i64(f.get(), "document_count", documents(), tmp);
    write_attr_i64(f.get(), "eos_id", eos_id_, tmp);
    write_attr_str(f.get(), "split", split_, tmp);
    H5_CHECK(H5Fflush(f.get(), H5F_SCOPE_GLOBAL), tmp, ": flush");
  }
  std::error_code ec;
  fs::rename(tmp, path_, ec);
  ANDY_CHECK_T(IoError, !ec, tmp, ": cannot rename to ", path_, ": ", ec.message());
  ShardSummary s;
  s.path = path_;
  s.tokens = tokens();
  s.documents = documents();
  s.checksum = file_checksum(path_);
  tokens_.clear();
  tokens_.shrink_to_fit();
  offsets_.assign(1, 0);
  return s;
}

ShardReader::ShardReader(const std::string& path) {
  std::lock_guard<std::recursive_mutex> lock(hdf5_mutex());
  hdf5_quiet();
  info_.path = path;
  ANDY_CHECK_T(IoError, fs::is_regular_file(path), path, ": no such shard file");
  H5Handle f(H5_CHECK(H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), path,
                      ": cannot open as HDF5 (truncated or corrupt shard?)"),
             H5Fclose);
  info_.format_version = read_attr_i64(f.get(), "format_version", path);
  ANDY_CHECK_T(IoError, info_.format_version >= 1 && info_.format_version <= kShardFormatVersion, path,
               ": shard format version ", info_.format_version, ", this build reads versions 1 to ",
               kShardFormatVersion);
  info_.vocab_size = read_attr_i64(f.get(), "vocab_size", path);
  info_.tokenizer_checksum = read_attr_str(f.get(), "tokenizer_checksum", path);
  info_.token_count = read_attr_i64(f.get(), "token_count", path);
  info_.document_count = read_attr_i64(f.get(), "document_count", path);
  info_.eos_id = read_attr_i64(f.get(), "eos_id", path);
  info_.split = read_attr_str(f.get(), "split", path);
  ANDY_CHECK_T(IoError, H5Lexists(f.get(), "tokens", H5P_DEFAULT) > 0, path,
               ": no 'tokens' dataset");
  ANDY_CHECK_T(IoError, H5Lexists(f.get(), "doc_offsets", H5P_DEFAULT) > 0, path,
               ": no 'doc_offsets' dataset");
  H5Handle ds(H5_CHECK(H5Dopen2(f.get(), "tokens", H5P_DEFAULT), path, ": open tokens"), H5Dclose);
  H5Handle space(H5_CHECK(H5Dget_space(ds.get()), path, ": tokens dataspace"), H5Sclose);
  ANDY_CHECK_T(IoError, H5Sget_simple_extent_ndims(space.get()) == 1, path, ": tokens is not 1-D");
  hsize_t n = 0;
  H5Sget_simple_extent_dims(space.get(), &n, nullptr);
  ANDY_CHECK_T(IoError, static_cast<int64_t>(n) == info_.token_count, path, ": tokens holds ", n,
               " entries but token_count says ", info_.token_count,
               " (truncated or corrupt shard)");
  H5Handle type(H5_CHECK(H5Dget_type(ds.get()), path, ": tokens type"), H5Tclose);
  ANDY_CHECK_T(IoError, H5Tget_class(type.get()) == H5T_INTEGER, path,
               ": tokens is not an integer dataset");
  info_.token_bytes = static_cast<int>(H5Tget_size(type.get()));
  H5Handle od(H5_CHECK(H5Dopen2(f.get(), "doc_offsets", H5P_DEFAULT), path, ": open doc_offsets"),
              H5Dclose);
  H5Handle ospace(H5_CHECK(H5Dget_space(od.get()), path, ": doc_offsets dataspace"), H5Sclose);
  hsize_t nd = 0;
  H5Sget_simple_extent_dims(ospace.get(), &nd, nullptr);
  ANDY_CHECK_T(IoError, static_cast<int64_t>(nd) == info_.document_count + 1, path,
               ": doc_offsets holds ", nd,
               " entries, expected document_count + 1 = ", info_.document_count + 1);
  file_ = std::move(f);
  tokens_ = std::move(ds);
}

ShardReader::~ShardReader() {
  std::lock_guard<std::recursive_mutex> lock(hdf5_mutex());
  tokens_.reset();
  file_.reset();
}

void ShardReader::read(int64_t offset, int64_t count, int64_t* out) const {
  ANDY_CHECK(offset >= 0 && count >= 0 && offset + count <= info_.token_count, info_.path,
             ": read [", offset, ", ", offset + count, ") outside [0, ", info_.token_count, ")");
  if (count == 0) return;
  std::lock_guard<std::recursive_mutex> lock(hdf5_mutex());
  H5Handle fspace(H5_CHECK(H5Dget_space(tokens_.get()), info_.path, ": tokens dataspace"),
                  H5Sclose);
  hsize_t start = static_cast<hsize_t>(offset), n = static_cast<hsize_t>(count);
  H5_CHECK(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, &start, nullptr, &n, nullptr),
           info_.path, ": select tokens");
  H5Handle mspace(H5_CHECK(H5Screate_simple(1, &n, nullptr), info_.path, ": memory space"),
                  H5Sclose);
  H5_CHECK(H5Dread(tokens_.get(), H5T_NATIVE_INT64, mspace.get(), fspace.get(), H5P_DEFAULT, out),
           info_.path, ": read tokens [", offset, ", ", offset + count, ") (corrupt shard?)");
}

std::vector<int64_t> ShardReader::read_all() const {
  std::vector<int64_t> v(static_cast<size_t>(info_.token_count));
  read(0, info_.token_count, v.data());
  return v;
}

std::vector<int64_t> ShardReader::doc_offsets() const {
  std::lock_guard<std::recursive_mutex> lock(hdf5_mutex());
  H5Handle od(
      H5_CHECK(H5Dopen2(file_.get(), "doc_offsets", H5P_DEFAULT), info_.path, ": open doc_offsets"),
      H5Dclose);
  std::vector<int64_t> v(static_cast<size_t>(info_.document_count + 1));
  H5_CHECK(H5Dread(od.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), info_.path,
           ": read doc_offsets");
  return v;
}

}  // namespace andy::data
