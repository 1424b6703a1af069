// The progress bar, metrics.jsonl and the loss-curve SVG, and the callbacks that drive them from a
// Trainer (moved here from the kiln command line so every Trainer user can attach them).
#include "train/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/cuda/runtime.h"
#include "core/error.h"
#include "core/file_io.h"

namespace kiln::train {

namespace {

std::string escape_xml(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<') out += "&lt;";
    else if (c == '>') out += "&gt;";
    else if (c == '&') out += "&amp;";
    else out += c;
  }
  return out;
}

}  // namespace

double memory_gib(Device device) {
  if (device.is_cuda()) return static_cast<double>(cuda::memory_stats(device.index).peak_allocated) / (1024.0 * 1024 * 1024);
  std::ifstream statm("/proc/self/statm");
  long pages = 0, resident = 0;
  statm >> pages >> resident;
  return static_cast<double>(resident) * static_cast<double>(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024 * 1024);
}

ProgressBar::ProgressBar(int64_t total_steps, int64_t first_step)
    : total_(total_steps), first_(first_step), tty_(isatty(fileno(stderr)) != 0), start_(std::chrono::steady_clock::now()) {}

void ProgressBar::update(int64_t step, double loss, double lr, double tokens_per_s, double mem_gib, bool log) {
  if (!tty_ && !log) return;
  std::string line;
  if (total_ > 0) {
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    const int64_t done = step - first_;
    const double eta = done > 0 ? elapsed / static_cast<double>(done) * static_cast<double>(total_ - step) : 0.0;
    const int width = 24;
    const int filled = std::clamp(static_cast<int>(width * static_cast<double>(step) / static_cast<double>(total_)), 0, width);
    const std::string bar = std::string(static_cast<size_t>(filled), '#') + std::string(static_cast<size_t>(width - filled), '.');
    line = fmt::format("[{}] step {}/{} | loss {:.4f} | lr {:.2e} | {:.0f} tok/s | mem {:.2f} GiB | ETA {}:{:02d}", bar,
                       step, total_, loss, lr, tokens_per_s, mem_gib, static_cast<int>(eta) / 60, static_cast<int>(eta) % 60);
  } else {
    line = fmt::format("step {} | loss {:.4f} | lr {:.2e} | {:.0f} tok/s | mem {:.2f} GiB", step, loss, lr, tokens_per_s, mem_gib);
  }
  if (tty_) std::fprintf(stderr, "\r%s\033[K", line.c_str());
  else std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

void ProgressBar::finish() {
  if (tty_) std::fprintf(stderr, "\n");
}

MetricsLog::MetricsLog(const std::string& path, bool append) : path_(path) {
  std::ofstream out(path, append ? std::ios::app : std::ios::trunc);
  KILN_CHECK(out.good(), "metrics", "cannot write {}", path);
}

void MetricsLog::write(const std::string& json_line) {
  std::ofstream out(path_, std::ios::app);
  out << json_line << "\n";
  out.flush();
  KILN_CHECK(out.good(), "metrics", "writing {} failed", path_);
}

void write_loss_svg(const std::string& path, const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                    const std::string& title) {
  const double w = 720, h = 400, left = 60, right = 20, top = 30, bottom = 45;
  int64_t s0 = INT64_MAX, s1 = INT64_MIN;
  double l0 = INFINITY, l1 = -INFINITY;
  for (const auto* pts : {&train, &eval})
    for (const LossPoint& p : *pts) {
      if (!std::isfinite(p.loss)) continue;
      s0 = std::min(s0, p.step), s1 = std::max(s1, p.step);
      l0 = std::min(l0, p.loss), l1 = std::max(l1, p.loss);
    }
  if (s0 > s1) s0 = 0, s1 = 1, l0 = 0, l1 = 1;
  if (s1 == s0) s1 = s0 + 1;
  if (l1 - l0 < 1e-9) l0 -= 0.5, l1 += 0.5;
  auto x = [&](int64_t s) { return left + (w - left - right) * static_cast<double>(s - s0) / static_cast<double>(s1 - s0); };
  auto y = [&](double l) { return top + (h - top - bottom) * (l1 - l) / (l1 - l0); };
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{}\" y=\"18\" font-size=\"14\">{}</text>\n",
      w, h, left, escape_xml(title));
  for (int i = 0; i <= 4; ++i) {  // grid and labels
    const double l = l0 + (l1 - l0) * i / 4.0, yy = y(l);
    const int64_t s = s0 + (s1 - s0) * i / 4;
    svg += fmt::format("<line x1=\"{}\" y1=\"{:.1f}\" x2=\"{}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>"
                       "<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{:.3f}</text>\n",
                       left, yy, w - right, yy, left - 6, yy + 4, l);
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n", x(s), h - bottom + 18, s);
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", (left + w - right) / 2, h - 8);
  if (!train.empty()) {
    svg += "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"";
    for (const LossPoint& p : train)
      if (std::isfinite(p.loss)) svg += fmt::format("{:.1f},{:.1f} ", x(p.step), y(p.loss));
    svg += "\"/>\n";
  }
  for (const LossPoint& p : eval)
    if (std::isfinite(p.loss)) svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3.5\" fill=\"#d62728\"/>\n", x(p.step), y(p.loss));
  svg += fmt::format("<text x=\"{}\" y=\"18\" fill=\"#1f77b4\">train</text><text x=\"{}\" y=\"18\" fill=\"#d62728\">eval</text>\n",
                     w - 120, w - 70);
  svg += "</svg>\n";
  write_file_atomic(path, svg, "metrics");
}

// ---- callbacks

void ProgressCallback::on_train_begin(Trainer& trainer) {
  if (trainer.parallel().rank() == 0) bar_.emplace(trainer.options().max_steps, trainer.state().step);
}

void ProgressCallback::on_step_end(Trainer&, const StepInfo& s) {
  last_ = s;
  if (bar_) bar_->update(s.step, s.loss, s.lr, s.tokens_per_s, s.memory_gib, s.log);
}

void ProgressCallback::on_step_skipped(Trainer&, const StepInfo& s) {
  if (bar_) std::fprintf(stderr, "%sskipped %s\n", bar_->tty() ? "\n" : "", s.skip_reason.c_str());
}

void ProgressCallback::on_eval(Trainer&, const EvalInfo& e) {
  if (!bar_) return;
  if (!last_.log) bar_->update(last_.step, last_.loss, last_.lr, last_.tokens_per_s, last_.memory_gib, true);
  std::fprintf(stderr, "%seval loss %.4f at step %lld\n", bar_->tty() ? "\n" : "", e.loss, static_cast<long long>(e.step));
}

void ProgressCallback::on_train_end(Trainer&, const EndInfo&) {
  if (bar_) bar_->finish();
  bar_.reset();
}

MetricsCallback::MetricsCallback(const std::string& dir, bool append, std::string title)
    : log_((std::filesystem::path(dir) / "metrics.jsonl").string(), append),
      svg_path_((std::filesystem::path(dir) / "loss_curve.svg").string()),
      title_(std::move(title)) {}

void MetricsCallback::plot(const Trainer& trainer) const {
  write_loss_svg(svg_path_, trainer.state().train_losses, trainer.state().eval_losses, title_);
}

void MetricsCallback::on_step_end(Trainer& trainer, const StepInfo& s) {
  if (trainer.parallel().rank() != 0 || !s.log) return;
  log_.write(nlohmann::json{{"step", s.step}, {"loss", s.loss}, {"lr", s.lr}, {"grad_norm", s.grad_norm},
                            {"tokens_per_s", s.tokens_per_s}, {"mem_gib", s.memory_gib}, {"tokens", s.tokens}}.dump());
  plot(trainer);
}

void MetricsCallback::on_step_skipped(Trainer& trainer, const StepInfo& s) {
  if (trainer.parallel().rank() == 0) log_.write(nlohmann::json{{"step", s.step}, {"skipped", s.skip_reason}}.dump());
}

void MetricsCallback::on_eval(Trainer& trainer, const EvalInfo& e) {
  if (trainer.parallel().rank() != 0) return;
  log_.write(nlohmann::json{{"step", e.step}, {"eval_loss", e.loss}}.dump());
  plot(trainer);
}

void MetricsCallback::on_train_end(Trainer& trainer, const EndInfo&) {
  if (trainer.parallel().rank() == 0) plot(trainer);
}

}  // namespace kiln::train
