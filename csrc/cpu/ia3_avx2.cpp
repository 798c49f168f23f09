// IA³'s loops (ia3_loops.h) vectorized for AVX2 (8 fp32 lanes) by the compiler.
#define PK_IA3_SUFFIX avx2
#define PK_IA3_TARGET "avx2,f16c,fma"
#include "ia3_simd.h"
