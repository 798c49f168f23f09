// Bottleneck adapter kernels for AVX-512 (F, BW, VL, DQ): bottleneck_body.h compiled for
// that target (elsewhere than x86-64 it compiles plainly: the dispatcher never
// picks this path there, but the symbols must exist).
#include <stdexcept>

#include "bottleneck_paths.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")
#endif

#define PK_BOTTLENECK_SUFFIX avx512
#include "bottleneck_body.h"
