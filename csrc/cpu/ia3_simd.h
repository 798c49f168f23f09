// Internal to csrc/cpu: the body of ia3_avx2.cpp and ia3_avx512.cpp, which define
// PK_IA3_SUFFIX (the path's name) and PK_IA3_TARGET (its GCC target string) and
// include this once: ia3_loops.h compiled for that instruction set.
//
// Headers with inline functions come first, outside the target region: those
// must compile for the baseline ISA in every file (one definition each).
#include <algorithm>
#include <type_traits>

#include "pykernels/cpu.h"

#if defined(__x86_64__) || defined(_M_X64)
// #pragma does not expand macros; _Pragma of a built string does.
#define PK_IA3_STRING(x) #x
#define PK_IA3_PRAGMA_TARGET(t) _Pragma(PK_IA3_STRING(GCC target(t)))
#pragma GCC push_options
PK_IA3_PRAGMA_TARGET(PK_IA3_TARGET)
#endif
#include "ia3_loops.h"

namespace pykernels::cpu {
// Not x86-64: the baseline loops under this path's name; the dispatcher never picks them.
#define PK_IA3_DEFINE_EXPANDED(suffix) PK_IA3_PATH_DEFINE(suffix)
PK_IA3_DEFINE_EXPANDED(PK_IA3_SUFFIX)
#undef PK_IA3_DEFINE_EXPANDED
}  // namespace pykernels::cpu

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC pop_options
#endif
