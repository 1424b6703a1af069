// Device parsing and printing.
#include "core/device.h"

#include "core/error.h"

namespace kiln {

Device::Device(const std::string& spec) {
  if (spec == "cpu") { type = DeviceType::cpu; index = 0; return; }
  if (spec == "cuda") { type = DeviceType::cuda; index = 0; return; }
  if (spec.rfind("cuda:", 0) == 0 && spec.size() > 5) {
    size_t used = 0;
    int i = -1;
    try { i = std::stoi(spec.substr(5), &used); } catch (const std::exception&) { used = 0; }
    if (used == spec.size() - 5 && i >= 0) { type = DeviceType::cuda; index = i; return; }
  }
  KILN_FAIL("device", "cannot parse device '{}' (expected 'cpu', 'cuda' or 'cuda:N')", spec);
}

std::string Device::str() const { return is_cpu() ? "cpu" : fmt::format("cuda:{}", index); }

}  // namespace kiln
