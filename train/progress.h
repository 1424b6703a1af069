// What a person watches during training, as Trainer callbacks: a one-line progress bar on stderr
// (step, loss, LR, tokens/s, memory, ETA), metrics.jsonl (one JSON object per logged step or eval)
// and loss_curve.svg redrawn as it goes; plus the pieces they are made of.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/device.h"
#include "train/trainer.h"

namespace kiln::train {

// Memory in use on `device`: the caching allocator's peak on CUDA, the process's resident set on the CPU.
double memory_gib(Device device);

class ProgressBar {
 public:
  // total_steps 0: unknown (no bar, no ETA).
  ProgressBar(int64_t total_steps, int64_t first_step);
  // Redraws the line (a terminal) or prints it (a pipe or file: only when `log` is set).
  void update(int64_t step, double loss, double lr, double tokens_per_s, double mem_gib, bool log);
  void finish();
  bool tty() const { return tty_; }

 private:
  int64_t total_, first_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

// Appends one JSON line per record to `path` (flushed each time, so a crash loses nothing).
class MetricsLog {
 public:
  MetricsLog(const std::string& path, bool append);
  void write(const std::string& json_line);

 private:
  std::string path_;
};

// A self-contained SVG line chart of the train loss (line) and eval loss (dots) against steps,
// written atomically (temporary file, then rename).
void write_loss_svg(const std::string& path, const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                    const std::string& title = "kiln: loss");

// The progress bar of a fit() (rank 0 only): updated every step, an "eval loss L at step N" line per
// eval, a "skipped step N: ..." line per skipped non-finite step, a final newline on a terminal.
class ProgressCallback final : public Callback {
 public:
  void on_train_begin(Trainer& trainer) override;
  void on_step_end(Trainer& trainer, const StepInfo& s) override;
  void on_step_skipped(Trainer& trainer, const StepInfo& s) override;
  void on_eval(Trainer& trainer, const EvalInfo& e) override;
  void on_train_end(Trainer& trainer, const EndInfo& end) override;

 private:
  std::optional<ProgressBar> bar_;
  StepInfo last_;
};

// <dir>/metrics.jsonl and <dir>/loss_curve.svg (rank 0 only): a line per logged step ({"step", "loss",
// "lr", "grad_norm", "tokens_per_s", "mem_gib", "tokens"}), per eval ({"step", "eval_loss"}) and per
// skipped non-finite step ({"step", "skipped"}: the reason); the
// SVG (from Trainer::state()'s loss history, so it spans resumes) after each of them and at the end.
// append: keep the lines of an earlier run (a resume).
class MetricsCallback final : public Callback {
 public:
  MetricsCallback(const std::string& dir, bool append, std::string title = "kiln: loss");
  void on_step_end(Trainer& trainer, const StepInfo& s) override;
  void on_step_skipped(Trainer& trainer, const StepInfo& s) override;
  void on_eval(Trainer& trainer, const EvalInfo& e) override;
  void on_train_end(Trainer& trainer, const EndInfo& end) override;

 private:
  void plot(const Trainer& trainer) const;
  MetricsLog log_;
  std::string svg_path_, title_;
};

}  // namespace kiln::train
