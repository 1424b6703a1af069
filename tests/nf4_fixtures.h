// The bitsandbytes fixtures (tests/data/nf4, made by tools/make_nf4_fixtures.py) and the comparisons with
// bnb's CUDA output that test_nf4.cpp defines and test_cuda_nf4.cpp and test_quantize.cpp use too.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "io/safetensors.h"
#include "quant/nf4.h"

namespace kiln::test::nf4 {

// The fixture folder tests/data/nf4 (tests/helpers.h says where it is looked for).
std::filesystem::path fixtures();
// The same dtype, element count and bytes.
void require_bytes_equal(const Tensor& a, const Tensor& b);
// Packed NF4 bytes of kiln (`ours`) and bnb (`theirs`) for weights `w` with f32 block absmax: equal except
// where a value lies at a level midpoint, which bnb's approximate CUDA reciprocal may round the other way.
void require_packed_match(const Tensor& w, const Tensor& absmax_f32, const Tensor& ours, const Tensor& theirs,
                          int64_t blocksize = 64);
// 8-bit absmax codes of kiln and bnb: equal except near a midpoint of bnb's dynamic code.
void require_codes_match(const Tensor& absmax_f32, float offset, const Tensor& nested, const Tensor& ours,
                         const Tensor& theirs, const Tensor& code);
// The NF4Weight bnb wrote for fixture case `p` ("caseN.") of blockwise.safetensors, and the cases there.
quant::NF4Weight fixture_weight(const io::SafetensorsFile& f, const std::string& p);
std::vector<std::string> fixture_cases(const io::SafetensorsFile& f);

}  // namespace kiln::test::nf4
