// Crash-safe file publishing: fsync of files and directories, atomic text files and an atomic
// swap of two directories. The convention: write everything under a temporary name, fsync it,
// rename it into place, then fsync the parent directory so the rename itself survives a power
// loss. Errors throw IoError naming the path and the system's reason (with the free space of
// the file system on ENOSPC).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace andy {

// fsync(2) of a file or a directory (a directory: its entries, i.e. renames into it).
void fsync_path(const std::string& path);
// Writes `text` to `path` through `path.tmp`: write, fsync, rename, fsync of the directory.
void write_file_durable(const std::string& path, const std::string& text);

// Moves a finished file or directory `tmp` to `dest` (rename, then fsync of the parent). An
// existing `dest` is replaced only with `replace` (moved aside, then removed once `tmp` is in
// place), else IoError. For outputs built under a temporary name beside their destination.
void publish_path(const std::string& tmp, const std::string& dest, bool replace);
// "<dest>.partial-<pid>": the temporary name publish_path expects beside `dest`.
std::string partial_path_for(const std::string& dest);
// Runs build(tmp) with tmp = partial_path_for(dest), then publish_path(tmp, dest, replace); on
// any failure removes tmp and rethrows. For outputs that must appear whole or not at all.
void build_then_publish(const std::string& dest, bool replace, const std::function<void(const std::string& tmp)>& build);
// ConfigError "output DEST already exists (pass --overwrite to replace it)" unless `replace`
// or nothing is there, and when DEST's directory does not exist: checked before any work.
void check_output_free(const std::string& dest, bool replace);

// The whole of a text file; IoError "cannot read PATH" when it cannot be opened.
std::string read_text_file(const std::string& path);

// A file written through our own descriptor, for writers that stream many pieces (archives,
// safetensors, GGUF). write() never throws: the first failure is remembered and later writes
// are dropped; finish() fsyncs and closes, and on any failure removes the file and throws
// IoError naming it, the reason and the free space. A writer destroyed without finish()
// removes its file (nothing partial is left behind). Not thread-safe; movable, not copyable.
//
//   DurableWriter w(tmp);  w.write(header.data(), header.size());  ...;  w.finish();
class DurableWriter {
 public:
  explicit DurableWriter(const std::string& path);  // IoError when it cannot be created
  DurableWriter(DurableWriter&& o) noexcept;
  DurableWriter(const DurableWriter&) = delete;
  DurableWriter& operator=(const DurableWriter&) = delete;
  ~DurableWriter();

  void write(const void* data, size_t n);
  void write(const std::string& s) { write(s.data(), s.size()); }
  void pad_to(uint64_t alignment);  // zero bytes up to the next multiple of alignment
  uint64_t bytes_written() const { return written_; }
  bool failed() const { return error_ != 0; }
  void finish();

 private:
  std::string path_;
  int fd_ = -1;
  int error_ = 0;
  uint64_t written_ = 0;
};
// Atomically exchanges two existing directory entries (renameat2 RENAME_EXCHANGE); where the
// file system does not support it, falls back to rename(a -> a.swap), rename(b -> a),
// rename(a.swap -> b) and says so in the returned string (empty on the atomic path).
std::string exchange_paths(const std::string& a, const std::string& b);
// "12.3 MiB free on /mnt/x" (or "" when statvfs fails): for messages about full disks.
std::string free_space_text(const std::string& path);
// Text for a failed write to `path` with errno-like code `err`: the reason, and on ENOSPC the
// free space left.
std::string io_failure_text(const std::string& path, int err);

}  // namespace andy
