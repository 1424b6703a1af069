// LRSchedule: constant, linear and cosine decay after a linear warmup (transformers' formulas).
#include "nn/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace kiln::nn {

LRSchedule::LRSchedule(const std::string& name, double base_lr, int64_t warmup_steps, int64_t total_steps)
    : name_(name), kind_(Kind::constant), base_lr_(base_lr), warmup_(warmup_steps), total_(total_steps) {
  if (name == "constant") kind_ = Kind::constant;
  else if (name == "linear") kind_ = Kind::linear;
  else if (name == "cosine") kind_ = Kind::cosine;
  else KILN_FAIL("lr_schedule", "unknown schedule '{}', expected constant, linear or cosine", name);
  KILN_CHECK(std::isfinite(base_lr) && base_lr >= 0.0, "lr_schedule", "base_lr must be finite and >= 0, got {}", base_lr);
  KILN_CHECK(warmup_steps >= 0, "lr_schedule", "warmup_steps must be >= 0, got {}", warmup_steps);
  KILN_CHECK(kind_ == Kind::constant || total_steps >= warmup_steps, "lr_schedule",
             "{} schedule needs total_steps >= warmup_steps, got {} < {}", name, total_steps, warmup_steps);
}

double LRSchedule::multiplier(int64_t step) const {
  KILN_CHECK(step >= 0, "lr_schedule", "step must be >= 0, got {}", step);
  if (step < warmup_) return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup_));
  if (kind_ == Kind::constant) return 1.0;
  const double progress =
      static_cast<double>(step - warmup_) / static_cast<double>(std::max<int64_t>(1, total_ - warmup_));
  if (kind_ == Kind::linear) return std::max(0.0, 1.0 - progress);
  return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
}

}  // namespace kiln::nn
