// Crash-safe file publishing: fsync of files and directories, atomic text files and an atomic
// swap of two directories. The convention: write everything under a temporary name, fsync it,
// rename it into place, then fsync the parent directory so the rename itself survives a power
// loss. Errors throw IoError naming the path and the system's reason (with the free space of
// the file system on ENOSPC).
#pragma once

#include <string>

namespace andy {

// fsync(2) of a file or a directory (a directory: its entries, i.e. renames into it).
void fsync_path(const std::string& path);
// Writes `text` to `path` through `path.tmp`: write, fsync, rename, fsync of the directory.
void write_file_durable(const std::string& path, const std::string& text);
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
