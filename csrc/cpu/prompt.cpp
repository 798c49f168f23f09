// Prompt tuning's input: the virtual tokens, then the token embeddings, in one
// pass (peft's PromptTuning for causal LMs, the layer: pykernels/nn/prompt.py):
//   out[b, :n]  = prompt [n, dim]
//   out[b, n:]  = weight[ids[b, s]]   for s < seq
// A pure gather: rows are copied as bytes, whatever the dtype. Ids are checked
// as they are read; the caller raises on the first one outside [0, vocab).
#include <cstring>

#include "pykernels/cpu.h"

namespace pykernels::cpu {

int64_t prompt_embed(int64_t elem_bytes, const int64_t* ids, int64_t seq, const void* weight,
                     int64_t vocab, int64_t dim, const void* prompt, int64_t n,
                     int64_t batch_begin, int64_t batch_end, void* out) {
  const int64_t row = dim * elem_bytes;
  const char* w = static_cast<const char*>(weight);
  char* o = static_cast<char*>(out);
  for (int64_t b = batch_begin; b < batch_end; ++b) {
    char* ob = o + b * (n + seq) * row;
    if (n > 0) std::memcpy(ob, prompt, size_t(n * row));
    for (int64_t s = 0; s < seq; ++s) {
      const int64_t id = ids[b * seq + s];
      if (id < 0 || id >= vocab) return b * seq + s;
      std::memcpy(ob + (n + s) * row, w + id * row, size_t(row));
    }
  }
  return -1;
}

}  // namespace pykernels::cpu
