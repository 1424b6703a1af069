// Whole-file reads and atomic writes, with errors naming the op and the path: the one place kiln
// reads a small file into memory or replaces one (configs, JSON, checkpoints' side files, plots).
#pragma once
#include <string>
#include <string_view>

namespace kiln {

// The bytes of `path`; kiln::Error "[op] cannot open '<path>': <reason>" when it cannot be read.
std::string read_file(const std::string& path, const char* op);
// Writes `bytes` to a temporary file next to `path`, flushes it to disk and renames it over `path`,
// so readers see the old file or the new one, never a part.
void write_file_atomic(const std::string& path, std::string_view bytes, const char* op);

}  // namespace kiln
