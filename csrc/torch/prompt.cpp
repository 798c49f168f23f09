// prompt_embed on the CPU (math: csrc/cpu/prompt.cpp): batch rows split across
// torch's threads; the checks both devices share.
#include "prompt.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "checks.h"
#include "pykernels/cpu.h"

namespace pykernels::binding::prompt {

void check_args(const at::Tensor& input_ids, const at::Tensor& weight, const at::Tensor& prompt) {
  constexpr const char* op = "prompt_embed";
  TORCH_CHECK_TYPE(input_ids.scalar_type() == at::kLong, op,
                   ": input_ids must be int64 (token ids), got ", input_ids.scalar_type());
  TORCH_CHECK_VALUE(input_ids.dim() == 2, op, ": input_ids must be [batch, seq], got shape ",
                    input_ids.sizes());
  TORCH_CHECK_TYPE(weight.is_floating_point(), op,
                   ": weight (the word embeddings) must be a float tensor, got ",
                   weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be [vocab, dim], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(prompt.dim() == 2 && prompt.size(1) == weight.size(1), op,
                    ": prompt must be [num_virtual_tokens, ", weight.size(1),
                    "] (dim from weight), got shape ", prompt.sizes());
  TORCH_CHECK_TYPE(prompt.scalar_type() == weight.scalar_type(), op,
                   ": prompt must have weight's dtype ", weight.scalar_type(), ", got ",
                   prompt.scalar_type(), " (cast it: peft casts the prompt to the embeddings' dtype)");
  check_same_device(op, weight, "weight", input_ids, "input_ids");
  check_same_device(op, weight, "weight", prompt, "prompt");
}

at::Tensor new_output(const at::Tensor& input_ids, const at::Tensor& weight,
                      const at::Tensor& prompt) {
  return at::empty({input_ids.size(0), prompt.size(0) + input_ids.size(1), weight.size(1)},
                   weight.options());
}

void check_first_bad(const at::Tensor& input_ids, int64_t first_bad, int64_t id, int64_t vocab) {
  if (first_bad < 0) return;
  const int64_t seq = input_ids.size(1);
  TORCH_CHECK_VALUE(false, "prompt_embed: input_ids[", first_bad / seq, ", ", first_bad % seq,
                    "] = ", id, " is outside the vocabulary [0, ", vocab, ")");
}

namespace {

at::Tensor prompt_embed_cpu(const at::Tensor& input_ids, const at::Tensor& weight,
                            const at::Tensor& prompt) {
  check_args(input_ids, weight, prompt);
  const at::Tensor ids = input_ids.contiguous();
  const at::Tensor w = weight.contiguous(), p = prompt.contiguous();
  at::Tensor out = new_output(ids, w, p);
  const int64_t batch = ids.size(0), seq = ids.size(1), dim = w.size(1), n = p.size(0);
  std::atomic<int64_t> first_bad{-1};
  at::parallel_for(0, batch, std::max<int64_t>(1, 65536 / std::max<int64_t>((n + seq) * dim, 1)),
                   [&](int64_t begin, int64_t end) {
                     const int64_t bad = cpu::prompt_embed(
                         w.element_size(), ids.const_data_ptr<int64_t>(), seq, w.const_data_ptr(),
                         w.size(0), dim, p.const_data_ptr(), n, begin, end, out.mutable_data_ptr());
                     int64_t seen = first_bad.load();
                     while (bad >= 0 && (seen < 0 || bad < seen) &&
                            !first_bad.compare_exchange_weak(seen, bad)) {
                     }
                   });
  const int64_t bad = first_bad.load();
  check_first_bad(ids, bad, bad >= 0 ? ids.const_data_ptr<int64_t>()[bad] : 0, w.size(0));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(pykernels, CPU, m) { m.impl("prompt_embed", &prompt_embed_cpu); }

}  // namespace pykernels::binding::prompt
