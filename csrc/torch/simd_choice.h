// Which CPU kernel path the ops use: the best this CPU supports, unless
// PYKERNELS_CPU_PATH (scalar | avx2 | avx512) or pykernels._C.set_cpu_path()
// chooses another, as the tests do to compare paths through the real ops.
#pragma once
#include "pykernels/cpu.h"

namespace pykernels::binding {

cpu::SimdPath active_cpu_path();
// Returns false (and changes nothing) for a name this CPU cannot run.
bool set_active_cpu_path(const char* name);

}  // namespace pykernels::binding
