// prompt_embed on CUDA (kernel: csrc/cuda/prompt.cu). A bad id is found by the
// kernel; reading it back synchronizes with the stream once per call.
#include <ATen/core/Tensor.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "prompt.h"
#include "pykernels/cuda.h"

namespace pykernels::binding::prompt {
namespace {

// Raises only once the device guard is gone (see nf4_quantize_cuda in nf4_cuda.cpp).
at::Tensor prompt_embed_cuda(const at::Tensor& input_ids, const at::Tensor& weight,
                             const at::Tensor& prompt) {
  check_args(input_ids, weight, prompt);
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  at::Tensor out;
  int64_t bad = kNone, bad_id = 0;
  {
    const c10::cuda::CUDAGuard guard(weight.device());
    const at::Tensor ids = input_ids.contiguous();
    const at::Tensor w = weight.contiguous(), p = prompt.contiguous();
    out = new_output(ids, w, p);
    at::Tensor first_bad = at::full({1}, kNone, ids.options());
    C10_CUDA_CHECK(cuda::prompt_embed(w.element_size(), ids.const_data_ptr<int64_t>(),
                                      ids.size(0), ids.size(1), w.const_data_ptr(), w.size(0),
                                      w.size(1), p.const_data_ptr(), p.size(0),
                                      out.mutable_data_ptr(),
                                      first_bad.mutable_data_ptr<int64_t>(),
                                      c10::cuda::getCurrentCUDAStream().stream()));
    bad = first_bad.item<int64_t>();
    if (bad != kNone) bad_id = ids.reshape(-1)[bad].item<int64_t>();
  }
  if (bad != kNone) check_first_bad(input_ids, bad, bad_id, weight.size(0));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) { m.impl("prompt_embed", &prompt_embed_cuda); }

}  // namespace pykernels::binding::prompt
