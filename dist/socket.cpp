// TCP sockets with deadlines (poll before every read and write), connection retries, and frames.
#include "dist/socket.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "core/error.h"

namespace kiln::dist::net {
namespace {

std::string errno_str(int e) { return std::strerror(e); }

int ms_left(Clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
  if (left <= 0) return 0;
  return left > 1000000 ? 1000000 : static_cast<int>(left);
}

// Waits until `fd` is ready for `events`; false on timeout.
bool wait_fd(int fd, short events, Clock::time_point deadline) {
  for (;;) {
    pollfd p{fd, events, 0};
    int n = ::poll(&p, 1, ms_left(deadline));
    if (n > 0) return true;
    if (n == 0) return false;
    if (errno != EINTR) KILN_FAIL("store", "poll failed: {}", errno_str(errno));
  }
}

void set_nodelay(int fd) {
  int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace

Socket& Socket::operator=(Socket&& o) noexcept {
  if (this != &o) {
    close();
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

void Socket::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

Socket listen_tcp(int port) {
  // Dual-stack IPv6 where available (takes IPv4 peers too), else IPv4.
  int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1, zero = 0;
  if (fd >= 0) {
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    ::setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero));
    sockaddr_in6 a{};
    a.sin6_family = AF_INET6;
    a.sin6_addr = in6addr_any;
    a.sin6_port = htons(static_cast<uint16_t>(port));
    if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0 && ::listen(fd, 1024) == 0) return Socket(fd);
    int e = errno;
    ::close(fd);
    if (e == EADDRINUSE) KILN_FAIL("store", "could not listen on port {}: {} (another job on this port? set MASTER_PORT)", port, errno_str(e));
  }
  fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  KILN_CHECK(fd >= 0, "store", "could not create a socket: {}", errno_str(errno));
  Socket s(fd);
  ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_ANY);
  a.sin_port = htons(static_cast<uint16_t>(port));
  KILN_CHECK(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0, "store",
             "could not listen on port {}: {} (another job on this port? set MASTER_PORT)", port, errno_str(errno));
  KILN_CHECK(::listen(fd, 1024) == 0, "store", "listen on port {} failed: {}", port, errno_str(errno));
  return s;
}

int local_port(const Socket& s) {
  sockaddr_storage a{};
  socklen_t len = sizeof(a);
  KILN_CHECK(::getsockname(s.fd(), reinterpret_cast<sockaddr*>(&a), &len) == 0, "store", "getsockname failed: {}",
             errno_str(errno));
  if (a.ss_family == AF_INET6) return ntohs(reinterpret_cast<sockaddr_in6*>(&a)->sin6_port);
  return ntohs(reinterpret_cast<sockaddr_in*>(&a)->sin_port);
}

Socket connect_tcp(const std::string& host, int port, Clock::time_point deadline) {
  std::string last_error = "timed out";
  for (;;) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const std::string service = std::to_string(port);
    int rc = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &res);
    if (rc != 0) {
      last_error = ::gai_strerror(rc);
    } else {
      for (addrinfo* ai = res; ai != nullptr; ai = ai->ai_next) {
        int fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, ai->ai_protocol);
        if (fd < 0) continue;
        Socket s(fd);
        int r = ::connect(fd, ai->ai_addr, ai->ai_addrlen);
        if (r != 0 && errno == EINPROGRESS) {
          if (wait_fd(fd, POLLOUT, std::min(deadline, Clock::now() + std::chrono::seconds(5)))) {
            int err = 0;
            socklen_t len = sizeof(err);
            ::getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
            r = err == 0 ? 0 : -1;
            errno = err;
          } else {
            errno = ETIMEDOUT;
          }
        }
        if (r == 0) {
          ::freeaddrinfo(res);
          int flags = ::fcntl(fd, F_GETFL, 0);
          ::fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
          set_nodelay(fd);
          return s;
        }
        last_error = errno_str(errno);
      }
      ::freeaddrinfo(res);
    }
    if (Clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  KILN_FAIL("store", "could not connect to the store at {}:{}: {} (is rank 0 running, and are MASTER_ADDR/MASTER_PORT "
            "the same on every rank?)", host, port, last_error);
}

void set_nonblocking(const Socket& s) {
  int flags = ::fcntl(s.fd(), F_GETFL, 0);
  ::fcntl(s.fd(), F_SETFL, flags | O_NONBLOCK);
  set_nodelay(s.fd());
}

std::string local_address_towards(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  KILN_CHECK(::getaddrinfo(host.c_str(), "9", &hints, &res) == 0 && res != nullptr, "dist",
             "could not resolve the address '{}' (MASTER_ADDR)", host);
  std::string out;
  for (addrinfo* ai = res; ai != nullptr && out.empty(); ai = ai->ai_next) {
    Socket s(::socket(ai->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0));
    if (!s.valid() || ::connect(s.fd(), ai->ai_addr, ai->ai_addrlen) != 0) continue;  // UDP: no packet is sent
    sockaddr_storage a{};
    socklen_t len = sizeof(a);
    if (::getsockname(s.fd(), reinterpret_cast<sockaddr*>(&a), &len) != 0) continue;
    char buf[INET6_ADDRSTRLEN] = {};
    const void* addr = a.ss_family == AF_INET6 ? static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&a)->sin6_addr)
                                               : static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&a)->sin_addr);
    if (::inet_ntop(a.ss_family, addr, buf, sizeof(buf)) != nullptr) out = buf;
  }
  ::freeaddrinfo(res);
  KILN_CHECK(!out.empty(), "dist", "found no local interface that routes to '{}' (MASTER_ADDR)", host);
  return out;
}

namespace {

void send_all(const Socket& s, const char* p, size_t n, Clock::time_point deadline) {
  while (n > 0) {
    ssize_t k = ::send(s.fd(), p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (k > 0) {
      p += k;
      n -= static_cast<size_t>(k);
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      KILN_CHECK(wait_fd(s.fd(), POLLOUT, deadline), "store", "timed out sending to the store");
      continue;
    }
    KILN_FAIL("store", "the connection to the store broke: {}", errno_str(errno));
  }
}

// false: end of stream before any byte.
bool recv_all(const Socket& s, char* p, size_t n, Clock::time_point deadline) {
  size_t got = 0;
  while (got < n) {
    KILN_CHECK(wait_fd(s.fd(), POLLIN, deadline), "store", "timed out waiting for the store's reply");
    ssize_t k = ::recv(s.fd(), p + got, n - got, MSG_DONTWAIT);
    if (k > 0) {
      got += static_cast<size_t>(k);
      continue;
    }
    if (k == 0) {
      if (got == 0) return false;
      KILN_FAIL("store", "the connection to the store closed in the middle of a message");
    }
    if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
    if (errno == ECONNRESET && got == 0) return false;
    KILN_FAIL("store", "the connection to the store broke: {}", errno_str(errno));
  }
  return true;
}

}  // namespace

void send_frame(const Socket& s, const std::string& payload, Clock::time_point deadline) {
  const auto n = static_cast<uint32_t>(payload.size());
  char head[4] = {static_cast<char>(n & 0xff), static_cast<char>((n >> 8) & 0xff), static_cast<char>((n >> 16) & 0xff),
                  static_cast<char>((n >> 24) & 0xff)};
  std::string frame(head, 4);
  frame += payload;
  send_all(s, frame.data(), frame.size(), deadline);
}

bool recv_frame(const Socket& s, std::string& payload, Clock::time_point deadline) {
  unsigned char head[4];
  if (!recv_all(s, reinterpret_cast<char*>(head), 4, deadline)) return false;
  const uint32_t n = head[0] | (head[1] << 8) | (head[2] << 16) | (static_cast<uint32_t>(head[3]) << 24);
  payload.resize(n);
  if (n > 0 && !recv_all(s, payload.data(), n, deadline))
    KILN_FAIL("store", "the connection to the store closed in the middle of a message");
  return true;
}

Writer& Writer::u8(uint8_t v) {
  data_.push_back(static_cast<char>(v));
  return *this;
}

Writer& Writer::i64(int64_t v) {
  auto u = static_cast<uint64_t>(v);
  for (int i = 0; i < 8; ++i) data_.push_back(static_cast<char>((u >> (8 * i)) & 0xff));
  return *this;
}

Writer& Writer::str(const std::string& v) {
  i64(static_cast<int64_t>(v.size()));
  data_ += v;
  return *this;
}

void Reader::need(size_t n) const {
  KILN_CHECK(pos_ + n <= data_.size(), "store", "malformed message ({} bytes, wanted {} more at {})", data_.size(), n, pos_);
}

uint8_t Reader::u8() {
  need(1);
  return static_cast<uint8_t>(data_[pos_++]);
}

int64_t Reader::i64() {
  need(8);
  uint64_t u = 0;
  for (int i = 0; i < 8; ++i) u |= static_cast<uint64_t>(static_cast<unsigned char>(data_[pos_ + static_cast<size_t>(i)])) << (8 * i);
  pos_ += 8;
  return static_cast<int64_t>(u);
}

std::string Reader::str() {
  const int64_t n = i64();
  KILN_CHECK(n >= 0, "store", "malformed message (negative string length)");
  need(static_cast<size_t>(n));
  std::string s = data_.substr(pos_, static_cast<size_t>(n));
  pos_ += static_cast<size_t>(n);
  return s;
}

}  // namespace kiln::dist::net
