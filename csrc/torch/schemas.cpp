// Every op's schema, in one place. Implementations register per backend in the
// op family's own file (nf4.cpp for CPU, nf4_cuda.cpp for CUDA); fake (meta)
// implementations and autograd live in pykernels/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(pykernels, m) {
  // NF4 (format: csrc/include/pykernels/nf4.h)
  m.def("nf4_quantize(Tensor x, int blocksize) -> (Tensor packed, Tensor absmax)");
  m.def(
      "nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, SymInt[] shape, "
      "ScalarType dtype) -> Tensor");
  m.def("nf4_dequantize_into(Tensor packed, Tensor absmax, int blocksize, Tensor(a!) out) -> ()");
  // 8-bit blockwise, for double quantization of NF4's absmax (pykernels/blockwise8.h)
  m.def("blockwise8_quantize(Tensor x, Tensor code, int blocksize) -> (Tensor q, Tensor absmax)");
  m.def(
      "blockwise8_dequantize(Tensor q, Tensor absmax, Tensor code, Tensor offset, int blocksize) "
      "-> Tensor");
}
