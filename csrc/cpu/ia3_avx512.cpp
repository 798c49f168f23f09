// IA³'s loops (ia3_loops.h) vectorized for AVX-512 (16 fp32 lanes) by the compiler.
#define PK_IA3_SUFFIX avx512
#define PK_IA3_TARGET "avx512f,avx512bw,avx512vl,avx512dq,f16c,fma"
#include "ia3_simd.h"
