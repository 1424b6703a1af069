// Learning-rate schedules with linear warmup, as transformers' get_{constant,linear,cosine}_schedule
// _with_warmup: lr_at(step) = base_lr * multiplier(step).
#pragma once
#include <cstdint>
#include <string>

namespace kiln::nn {

class LRSchedule {
 public:
  // name: "constant", "linear" or "cosine" (kiln::Error "[lr_schedule] ..." otherwise); warmup_steps
  // >= 0; total_steps >= warmup_steps for linear and cosine (ignored by constant).
  LRSchedule(const std::string& name, double base_lr, int64_t warmup_steps, int64_t total_steps = 0);

  // step < warmup: step / max(1, warmup). After warmup, with progress = (step - warmup) /
  // max(1, total - warmup): constant 1; linear max(0, 1 - progress); cosine
  // max(0, 0.5 (1 + cos(pi progress))) (half a cycle, transformers' default).
  double multiplier(int64_t step) const;
  double lr_at(int64_t step) const { return base_lr_ * multiplier(step); }

  const std::string& name() const { return name_; }
  double base_lr() const { return base_lr_; }
  int64_t warmup_steps() const { return warmup_; }
  int64_t total_steps() const { return total_; }

 private:
  enum class Kind { constant, linear, cosine };
  std::string name_;
  Kind kind_;
  double base_lr_;
  int64_t warmup_;
  int64_t total_;
};

}  // namespace kiln::nn
