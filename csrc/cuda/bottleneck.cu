// Bottleneck adapter epilogues on CUDA (math: csrc/cpu/bottleneck.cpp): the
// elementwise steps between and after the two products, which the binding
// (csrc/torch/bottleneck_cuda.cpp via bottleneck.cpp) runs through cuBLAS.
// One thread per element, grid-stride; fp32 arithmetic rounded per operation
// (mul_rn / add_rn, no FMA contraction) so relu and the epilogue give the
// CPU's bits; gelu and silu use the device's erff / expf,
// within an ulp or two of glibc's.
#include "launch.h"
#include "pykernels/bottleneck.h"
#include "pykernels/cuda.h"

namespace pykernels::cuda {
namespace {

template <DType D> using Elem = typename Storage<D>::type;

template <DType D>
__global__ void __launch_bounds__(kThreads)
    activate_kernel(Act act, Elem<D>* z, int64_t n, Elem<D>* pre_out) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kThreads) {
    if (pre_out != nullptr) pre_out[i] = z[i];
    store_from_float<D>(z, i, act_forward(act, load_as_float<D>(z, i)));
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    epilogue_kernel(const Elem<D>* up, const Elem<D>* bias, const Elem<D>* residual, int64_t n,
                    int64_t d, float scale, Elem<D>* out) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kThreads) {
    const float y = add_rn(load_as_float<D>(up, i), load_as_float<D>(bias, i % d));
    store_from_float<D>(out, i, add_rn(load_as_float<D>(residual, i), mul_rn(scale, y)));
  }
}

template <DType D>
__global__ void __launch_bounds__(kThreads)
    act_backward_kernel(Act act, const Elem<D>* pre, Elem<D>* g, int64_t n, float scale,
                        Elem<D>* a_out) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * kThreads) {
    const float z = load_as_float<D>(pre, i);
    store_from_float<D>(
        g, i, mul_rn(mul_rn(scale, load_as_float<D>(g, i)), act_derivative(act, z)));
    store_from_float<D>(a_out, i, act_forward(act, z));
  }
}

}  // namespace

cudaError_t bottleneck_activate(DType dtype, Act act, void* z, int64_t rows, int64_t m,
                                void* pre_out, cudaStream_t stream) {
  const int64_t n = rows * m;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    activate_kernel<D><<<ctas_for(n, kThreads), kThreads, 0, stream>>>(
        act, static_cast<Elem<D>*>(z), n, static_cast<Elem<D>*>(pre_out));
    return cudaGetLastError();
  });
}

cudaError_t bottleneck_epilogue(DType dtype, const void* up, const void* bias,
                                const void* residual, int64_t rows, int64_t d, float scale,
                                void* out, cudaStream_t stream) {
  const int64_t n = rows * d;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    epilogue_kernel<D><<<ctas_for(n, kThreads), kThreads, 0, stream>>>(
        static_cast<const Elem<D>*>(up), static_cast<const Elem<D>*>(bias),
        static_cast<const Elem<D>*>(residual), n, d, scale, static_cast<Elem<D>*>(out));
    return cudaGetLastError();
  });
}

cudaError_t bottleneck_act_backward(DType dtype, Act act, const void* pre, void* g, int64_t rows,
                                    int64_t m, float scale, void* a_out, cudaStream_t stream) {
  const int64_t n = rows * m;
  if (n == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    constexpr DType D = decltype(tag)::value;
    act_backward_kernel<D><<<ctas_for(n, kThreads), kThreads, 0, stream>>>(
        act, static_cast<const Elem<D>*>(pre), static_cast<Elem<D>*>(g), n, scale,
        static_cast<Elem<D>*>(a_out));
    return cudaGetLastError();
  });
}

}  // namespace pykernels::cuda
