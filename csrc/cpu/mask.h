// The CPU kernels read bool/uint8, int32, int64 and float32 masks as they are (nonzero = valid,
// checks::mask_dtype). with_mask hands a host-side loop (GAE) the typed pointer; masked_rows
// describes token rows and their mask for the dispatched kernels (kernel_args.h), which switch on
// the dtypes themselves.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "kernel_args.h"

namespace fastalign::cpu {

// x [rows, steps] and mask, both contiguous, as the kernels take them.
inline MaskedRows masked_rows(const at::Tensor& x, const at::Tensor& mask) {
  return {x.scalar_type(), mask.const_data_ptr(), mask.scalar_type(), x.size(1)};
}

// f(const M* mask) with M uint8_t (bool/uint8), int32_t, int64_t or float.

template <typename F>
void with_mask(const at::Tensor& mask, F&& f) {
  switch (mask.scalar_type()) {
    case at::kBool:
    case at::kByte:
      return f(static_cast<const uint8_t*>(mask.const_data_ptr()));
    case at::kInt:
      return f(mask.const_data_ptr<int32_t>());
    case at::kLong:
      return f(mask.const_data_ptr<int64_t>());
    case at::kFloat:
      return f(mask.const_data_ptr<float>());
    default:
      TORCH_CHECK(false, "mask dtype ", mask.scalar_type(), " is not read by the CPU kernels");
  }
}

}  // namespace fastalign::cpu
