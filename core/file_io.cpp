// read_file / write_file_atomic (core/file_io.h).
#include "core/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace kiln {

std::string read_file(const std::string& path, const char* op) {
  std::ifstream in(path, std::ios::binary);
  KILN_CHECK(in.good(), op, "cannot open '{}': {}", path, std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  KILN_CHECK(!in.bad(), op, "reading '{}' failed", path);
  return ss.str();
}

void write_file_atomic(const std::string& path, std::string_view bytes, const char* op) {
  const std::string tmp = path + ".tmp";
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  KILN_CHECK(fd >= 0, op, "cannot write '{}': {}", tmp, std::strerror(errno));
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const std::string reason = std::strerror(errno);
      ::close(fd);
      std::remove(tmp.c_str());
      KILN_FAIL(op, "writing '{}' failed: {}", tmp, reason);
    }
    done += static_cast<size_t>(n);
  }
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  KILN_CHECK(synced, op, "flushing '{}' to disk failed: {}", tmp, std::strerror(errno));
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  KILN_CHECK(!ec, op, "renaming '{}' to '{}' failed: {}", tmp, path, ec.message());
}

}  // namespace kiln
