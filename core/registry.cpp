// The registration list: appended to during static initialisation, drained by run_registrations().
#include "core/registry.h"

#include <atomic>
#include <mutex>
#include <vector>

namespace kiln {
namespace {

struct Pending {
  const char* what;
  void (*fn)();
};

// Function-local statics: safe to use from other translation units' static initialisers.
std::vector<Pending>& pending() {
  static std::vector<Pending> list;
  return list;
}
std::recursive_mutex& registry_mutex() {
  static std::recursive_mutex m;
  return m;
}
std::atomic<bool>& dirty() {
  static std::atomic<bool> d{false};
  return d;
}

}  // namespace

Registration::Registration(const char* what, void (*fn)()) {
  std::lock_guard<std::recursive_mutex> lock(registry_mutex());
  pending().push_back({what, fn});
  dirty().store(true, std::memory_order_release);
}

void run_registrations() {
  if (!dirty().load(std::memory_order_acquire)) return;
  // Recursive: a registration may allocate or dispatch (which calls back here and finds nothing new
  // for itself, since the list is taken before running it).
  std::lock_guard<std::recursive_mutex> lock(registry_mutex());
  while (!pending().empty()) {
    std::vector<Pending> now;
    now.swap(pending());
    for (const Pending& p : now) p.fn();
  }
  dirty().store(false, std::memory_order_release);
}

}  // namespace kiln
