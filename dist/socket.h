// Plain POSIX TCP sockets for the store (internal): listen, connect with retries until a deadline,
// send/receive whole buffers with deadlines, and the length-prefixed frames the store speaks.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln::dist::net {

using Clock = std::chrono::steady_clock;

class Socket {
 public:
  Socket() = default;
  explicit Socket(int fd) : fd_(fd) {}
  ~Socket() { close(); }
  Socket(Socket&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Socket& operator=(Socket&& o) noexcept;
  Socket(const Socket&) = delete;
  Socket& operator=(const Socket&) = delete;
  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void close();

 private:
  int fd_ = -1;
};

// Listens on every interface at `port` (0: the system picks one; see local_port).
Socket listen_tcp(int port);
int local_port(const Socket& s);
// Connects to host:port, retrying refused/unreachable attempts until `deadline`.
Socket connect_tcp(const std::string& host, int port, Clock::time_point deadline);
void set_nonblocking(const Socket& s);
// The address of this machine's interface that routes to `host` (how peers reach this process).
std::string local_address_towards(const std::string& host);

// Frames: a u32 little-endian length, then the payload. Both throw kiln::Error("[store] ...") on a
// timeout or a broken connection; recv_frame returns false on a clean end of stream before a frame.
void send_frame(const Socket& s, const std::string& payload, Clock::time_point deadline);
bool recv_frame(const Socket& s, std::string& payload, Clock::time_point deadline);

// Payload fields.
class Writer {
 public:
  Writer& u8(uint8_t v);
  Writer& i64(int64_t v);
  Writer& str(const std::string& v);
  const std::string& data() const { return data_; }

 private:
  std::string data_;
};

class Reader {
 public:
  explicit Reader(const std::string& data) : data_(data) {}
  uint8_t u8();
  int64_t i64();
  std::string str();
  bool done() const { return pos_ == data_.size(); }

 private:
  void need(size_t n) const;
  const std::string& data_;
  size_t pos_ = 0;
};

}  // namespace kiln::dist::net
