// Strided copies for CPU kernels: copy_into converts and broadcasts any strided source into any
// strided destination; raw_view makes a strided alias without dispatch (kernel-internal use only).
#pragma once
#include "core/tensor.h"

namespace kiln::cpu {

void copy_into(const Tensor& dst, const Tensor& src);
Tensor raw_view(const Tensor& base, const Shape& shape, const Shape& strides, int64_t offset);

}  // namespace kiln::cpu
