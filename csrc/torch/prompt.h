// prompt_embed's argument checks and error, shared by the CPU (prompt.cpp) and
// CUDA (prompt_cuda.cpp) implementations.
#pragma once
#include <ATen/core/Tensor.h>

namespace pykernels::binding::prompt {

// input_ids int64 [B, S]; weight [V, D] and prompt [n, D], one float dtype; one device.
void check_args(const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt);

// The output, empty: [B, n + S, D] in weight's dtype.
at::Tensor new_output(const at::Tensor& input_ids, const at::Tensor& weight,
                      const at::Tensor& prompt);

// Raises naming the first id outside [0, V) (flat index first_bad of input_ids) when >= 0.
void check_first_bad(const at::Tensor& input_ids, int64_t first_bad, int64_t id, int64_t vocab);

}  // namespace pykernels::binding::prompt
