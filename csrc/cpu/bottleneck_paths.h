// Internal to csrc/cpu: the bottleneck adapter kernels of each instruction set
// behind the dispatcher in bottleneck.cpp, all built from bottleneck_body.h.
// Same arguments as pykernels::cpu::bottleneck_* in cpu.h, less the path.
#pragma once
#include "lora_paths.h"  // Elem<D>, PK_LORA_DTYPE_SWITCH
#include "pykernels/bottleneck.h"

namespace pykernels::cpu {

#define PK_BOTTLENECK_PATH(suffix)                                                                \
  void bottleneck_activate_##suffix(DType dtype, Act act, void* z, int64_t rows, int64_t m,      \
                                    void* pre_out);                                               \
  void bottleneck_epilogue_##suffix(DType dtype, const void* up, const void* bias,                \
                                    const void* residual, int64_t rows, int64_t d, float scale,   \
                                    void* out);                                                   \
  void bottleneck_act_backward_##suffix(DType dtype, Act act, const void* pre, void* g,          \
                                        int64_t rows, int64_t m, float scale, void* a_out);  \
  void bottleneck_column_sum_##suffix(DType dtype, const void* x, int64_t rows, int64_t cols,    \
                                      int64_t col_begin, int64_t col_end, float* out);
PK_BOTTLENECK_PATH(scalar)
PK_BOTTLENECK_PATH(avx2)
PK_BOTTLENECK_PATH(avx512)
#undef PK_BOTTLENECK_PATH

}  // namespace pykernels::cpu
