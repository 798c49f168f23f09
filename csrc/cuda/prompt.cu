// Prompt tuning's gather on CUDA (math: csrc/cpu/prompt.cpp): one CTA per output
// row (b, t), copying dim elements of the prompt or of the id's embedding row in
// 4-byte words when the row size allows, bytes otherwise. A bad id writes nothing
// and lowers *first_bad (atomicMin), which the binding reads back.
#include <cuda_runtime.h>

#include "launch.h"
#include "pykernels/cuda.h"

namespace pykernels::cuda {
namespace {

template <class Word>
__global__ void __launch_bounds__(kThreads)
prompt_embed_kernel(const int64_t* __restrict__ ids, int64_t batch, int64_t seq,
                    const Word* __restrict__ weight, int64_t vocab, int64_t words,
                    const Word* __restrict__ prompt, int64_t n, Word* __restrict__ out,
                    unsigned long long* first_bad) {
  const int64_t rows = batch * (n + seq);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t b = r / (n + seq), t = r % (n + seq);
    const Word* src;
    if (t < n) {
      src = prompt + t * words;
    } else {
      const int64_t id = ids[b * seq + (t - n)];
      if (id < 0 || id >= vocab) {
        if (threadIdx.x == 0) atomicMin(first_bad, (unsigned long long)(b * seq + (t - n)));
        continue;
      }
      src = weight + id * words;
    }
    for (int64_t i = threadIdx.x; i < words; i += kThreads) out[r * words + i] = src[i];
  }
}

template <class Word>
cudaError_t launch(const int64_t* ids, int64_t batch, int64_t seq, const void* weight,
                   int64_t vocab, int64_t words, const void* prompt, int64_t n, void* out,
                   int64_t* first_bad, cudaStream_t stream) {
  prompt_embed_kernel<Word><<<ctas_for(batch * (n + seq), 1), kThreads, 0, stream>>>(
      ids, batch, seq, static_cast<const Word*>(weight), vocab, words,
      static_cast<const Word*>(prompt), n, static_cast<Word*>(out),
      reinterpret_cast<unsigned long long*>(first_bad));
  return cudaGetLastError();
}

}  // namespace

cudaError_t prompt_embed(int64_t elem_bytes, const int64_t* ids, int64_t batch, int64_t seq,
                         const void* weight, int64_t vocab, int64_t dim, const void* prompt,
                         int64_t n, void* out, int64_t* first_bad, cudaStream_t stream) {
  if (batch < 0 || seq < 0 || n < 0 || dim < 0 || elem_bytes < 1) return cudaErrorInvalidValue;
  const int64_t bytes = dim * elem_bytes;
  if (batch * (n + seq) * bytes == 0) return cudaSuccess;
  if (bytes % 4 == 0 && aligned(weight, 4) && aligned(prompt, 4) && aligned(out, 4))
    return launch<uint32_t>(ids, batch, seq, weight, vocab, bytes / 4, prompt, n, out, first_bad,
                            stream);
  return launch<uint8_t>(ids, batch, seq, weight, vocab, bytes, prompt, n, out, first_bad, stream);
}

}  // namespace pykernels::cuda
