// The multi bottleneck adapter ops on CUDA: multi_bottleneck.cpp's ops over
// bottleneck_cuda.cpp's epilogue kernels (products through cuBLAS). The ids
// come to the host once per call, to group the rows (a handful of int64: one
// sync, as the group sizes set every launch's shape).
#include <torch/library.h>

#include "multi_bottleneck.h"

namespace pykernels::binding::multi_bottleneck {

TORCH_LIBRARY_IMPL(pykernels, CUDA, m) {
  m.impl("multi_bottleneck", &multi_bottleneck);
  m.impl("multi_bottleneck_backward", &multi_bottleneck_backward);
}

}  // namespace pykernels::binding::multi_bottleneck
