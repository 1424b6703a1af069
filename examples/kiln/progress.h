// What a user sees during a run: a one-line progress bar (step, loss, LR, tokens/s, memory, ETA),
// metrics.jsonl (one JSON object per logged step or eval), and loss_curve.svg redrawn as it goes.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln::app {

struct LossPoint {
  int64_t step;
  double loss;
};

// Memory in use for the run's device: the caching allocator's peak on CUDA, the resident set on the CPU.
double memory_gib(bool cuda);

class ProgressBar {
 public:
  ProgressBar(int64_t total_steps, int64_t first_step);
  // Redraws the line (a terminal) or prints it (a pipe or file: only when `log` is set).
  void update(int64_t step, double loss, double lr, double tokens_per_s, double mem_gib, bool log);
  void finish();

 private:
  int64_t total_, first_;
  bool tty_;
  std::chrono::steady_clock::time_point start_;
};

// Appends one JSON line per record to `path` (flushed each time, so a crash loses nothing).
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path, bool append);
  void write(const std::string& json_line);

 private:
  std::string path_;
};

// A self-contained SVG line chart of the train loss (line) and eval loss (dots) against steps,
// written atomically (temporary file, then rename).
void write_loss_svg(const std::string& path, const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval);

}  // namespace kiln::app
