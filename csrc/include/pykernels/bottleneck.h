// Bottleneck adapter activations, host and device: one definition serves the
// CPU paths, the CUDA kernels and (through the same formulas) the tests.
//   relu(z) = max(z, 0)                 relu'(z) = z > 0
//   gelu(z) = z·Φ(z), Φ exact (erf)     gelu'(z) = Φ(z) + z·φ(z)   (torch's default gelu)
//   silu(z) = z·σ(z)                    silu'(z) = σ(z)·(1 + z·(1 − σ(z)))
#pragma once
#include <math.h>

#include <cstdint>

#include "pykernels/common.h"

namespace pykernels {

enum class Act : int32_t { ReLU = 0, GELU = 1, SiLU = 2 };

PK_HD float act_forward(Act act, float z) {
  switch (act) {
    case Act::ReLU: return z > 0.0f ? z : 0.0f;
    case Act::GELU: return 0.5f * z * (1.0f + erff(z * 0.70710678118654752f));
    case Act::SiLU: return z / (1.0f + expf(-z));
  }
  return z;
}

PK_HD float act_derivative(Act act, float z) {
  switch (act) {
    case Act::ReLU: return z > 0.0f ? 1.0f : 0.0f;
    case Act::GELU:
      return 0.5f * (1.0f + erff(z * 0.70710678118654752f)) +
             z * 0.39894228040143268f * expf(-0.5f * z * z);
    case Act::SiLU: {
      const float sig = 1.0f / (1.0f + expf(-z));
      return sig * (1.0f + z * (1.0f - sig));
    }
  }
  return 1.0f;
}

}  // namespace pykernels
