// A program outside kiln's tree, built against an installed kiln (pkg-config kiln) by tools/test.sh:
// tensors, a Linear forward and backward checked against loops, an NF4 round trip. Passing proves the
// installed headers compile alone and that kiln.pc links the libraries whole (the CPU kernels, the CPU
// allocator, autograd's recorder and quant's kernels register from objects nothing names).
#include <cmath>
#include <cstdio>
#include <vector>

#include "core/ops.h"
#include "core/random.h"
#include "nn/layers.h"
#include "quant/nf4.h"

using namespace kiln;

int main() {
  manual_seed(7);
  const int64_t n = 5, in = 8, out = 3;
  nn::Linear linear(in, out, /*bias=*/true);
  Tensor x = randn({n, in});
  Tensor y = linear(x);  // (n, out)
  Tensor loss = sum(y * y);
  loss.backward();

  std::vector<float> xv = x.to_vector<float>(), w = linear.weight().to_vector<float>();
  std::vector<float> b = linear.bias().to_vector<float>(), yv = y.to_vector<float>();
  std::vector<float> dw = linear.weight().grad().to_vector<float>(), db = linear.bias().grad().to_vector<float>();
  double worst = 0, checksum = 0;
  for (int64_t o = 0; o < out; ++o) {
    std::vector<double> dw_ref(in, 0.0);
    double db_ref = 0;
    for (int64_t r = 0; r < n; ++r) {
      double acc = b[o];
      for (int64_t i = 0; i < in; ++i) acc += double(xv[r * in + i]) * w[o * in + i];
      worst = std::fmax(worst, std::fabs(acc - yv[r * out + o]));
      db_ref += 2 * acc;  // d(sum y^2)/dy = 2y
      for (int64_t i = 0; i < in; ++i) dw_ref[i] += 2 * acc * xv[r * in + i];
      checksum += acc;
    }
    worst = std::fmax(worst, std::fabs(db_ref - db[o]));
    for (int64_t i = 0; i < in; ++i) worst = std::fmax(worst, std::fabs(dw_ref[i] - dw[o * in + i]));
  }

  Tensor big = randn({4, 128});
  Tensor back = quant::dequantize_nf4(quant::quantize_nf4(big), DType::f32);
  double nf4_err = amax(abs(back - big)).item<float>();

  std::printf("consumer: loss %.6f, checksum %.6f, max error vs loops %.2e, NF4 round-trip max error %.3f\n",
              loss.item<float>(), checksum, worst, nf4_err);
  if (!(worst < 1e-3) || !(nf4_err < 1.0)) {
    std::printf("consumer: FAILED\n");
    return 1;
  }
  std::printf("consumer: ok\n");
  return 0;
}
