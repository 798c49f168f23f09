// Bottleneck adapter kernels for AVX2 (+F16C, FMA): bottleneck_body.h compiled for
// that target (elsewhere than x86-64 it compiles plainly: the dispatcher never
// picks this path there, but the symbols must exist).
#include <stdexcept>

#include "bottleneck_paths.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC target("avx2,f16c,fma")
#endif

#define PK_BOTTLENECK_SUFFIX avx2
#include "bottleneck_body.h"
