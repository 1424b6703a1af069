// A handle that removes a registered hook (module forward hooks, autograd gradient hooks). Removing
// twice, or after the owner is gone, does nothing.
#pragma once
#include <functional>
#include <utility>

namespace kiln {

class HookHandle {
 public:
  HookHandle() = default;
  explicit HookHandle(std::function<void()> remover) : remover_(std::move(remover)) {}
  void remove() {
    if (remover_) std::exchange(remover_, nullptr)();
  }

 private:
  std::function<void()> remover_;
};

}  // namespace kiln
