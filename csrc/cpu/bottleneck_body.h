// The bottleneck adapter kernels' loops, written once in plain C++ and compiled
// three times: bottleneck.cpp (the scalar reference), bottleneck_avx2.cpp and
// bottleneck_avx512.cpp, which set their target and PK_BOTTLENECK_SUFFIX first.
// The loops are elementwise with the activation a template parameter, so the
// compiler vectorizes them for each target (bf16 and fp32: conversions are
// integer shifts and adds; relu and the epilogue are a few vector ops); each
// element goes through the same fp32 operations on every path, so all paths
// give the same bits (-ffp-contract=off keeps FMAs out). gelu's erff and
// silu's expf stay libm calls per element: they touch only the [T, m]
// bottleneck, 1/16 of the [T, d] the epilogue touches at reduction 16.
//
// Everything here has internal linkage except the four suffixed entry points.

namespace pykernels::cpu {
namespace {

template <DType D, Act A>
void activate_loop(Elem<D>* z, int64_t rows, int64_t m, Elem<D>* pre_out) {
  for (int64_t t = 0; t < rows; ++t) {
    Elem<D>* zr = z + t * m;
    for (int64_t j = 0; j < m; ++j) {
      const float pre = load_as_float<D>(zr, j);
      if (pre_out != nullptr) pre_out[t * m + j] = zr[j];
      store_from_float<D>(zr, j, act_forward(A, pre));
    }
  }
}

template <DType D>
void epilogue_loop(const Elem<D>* up, const Elem<D>* bias, const Elem<D>* residual, int64_t rows,
                   int64_t d, float scale, Elem<D>* out) {
  for (int64_t t = 0; t < rows; ++t) {
    const Elem<D>* u = up + t * d;
    const Elem<D>* r = residual + t * d;
    Elem<D>* o = out + t * d;
    for (int64_t j = 0; j < d; ++j) {
      const float y = load_as_float<D>(u, j) + load_as_float<D>(bias, j);
      store_from_float<D>(o, j, load_as_float<D>(r, j) + scale * y);
    }
  }
}

template <DType D, Act A>
void act_backward_loop(const Elem<D>* pre, Elem<D>* g, int64_t rows, int64_t m, float scale,
                       Elem<D>* a_out) {
  for (int64_t i = 0; i < rows * m; ++i) {
    const float z = load_as_float<D>(pre, i);
    store_from_float<D>(g, i, scale * load_as_float<D>(g, i) * act_derivative(A, z));
    store_from_float<D>(a_out, i, act_forward(A, z));
  }
}

template <DType D>
void column_sum_loop(const Elem<D>* x, int64_t rows, int64_t cols, int64_t col_begin,
                     int64_t col_end, float* out) {
  const int64_t width = col_end - col_begin;
  for (int64_t j = 0; j < width; ++j) out[j] = 0.0f;
  for (int64_t t = 0; t < rows; ++t) {
    const Elem<D>* row = x + t * cols + col_begin;
    for (int64_t j = 0; j < width; ++j) out[j] += load_as_float<D>(row, j);
  }
}

// Runs `call` with A bound to act.
#define PK_BOTTLENECK_ACT_SWITCH(call)          \
  switch (act) {                                \
    case Act::ReLU: {                           \
      constexpr Act A = Act::ReLU;              \
      call;                                     \
      return;                                   \
    }                                           \
    case Act::GELU: {                           \
      constexpr Act A = Act::GELU;              \
      call;                                     \
      return;                                   \
    }                                           \
    case Act::SiLU: {                           \
      constexpr Act A = Act::SiLU;              \
      call;                                     \
      return;                                   \
    }                                           \
  }                                             \
  throw std::invalid_argument("bottleneck: unknown activation")

}  // namespace

#define PK_BOTTLENECK_CAT2(a, b) a##b
#define PK_BOTTLENECK_CAT(a, b) PK_BOTTLENECK_CAT2(a, b)
#define PK_BOTTLENECK_NAME(name) PK_BOTTLENECK_CAT(name##_, PK_BOTTLENECK_SUFFIX)

void PK_BOTTLENECK_NAME(bottleneck_activate)(DType dtype, Act act, void* z, int64_t rows,
                                             int64_t m, void* pre_out) {
  PK_LORA_DTYPE_SWITCH("bottleneck_activate",
                       PK_BOTTLENECK_ACT_SWITCH((activate_loop<D, A>(
                           static_cast<E*>(z), rows, m, static_cast<E*>(pre_out)))));
}

void PK_BOTTLENECK_NAME(bottleneck_epilogue)(DType dtype, const void* up, const void* bias,
                                             const void* residual, int64_t rows, int64_t d,
                                             float scale, void* out) {
  PK_LORA_DTYPE_SWITCH("bottleneck_epilogue",
                       (epilogue_loop<D>(static_cast<const E*>(up), static_cast<const E*>(bias),
                                         static_cast<const E*>(residual), rows, d, scale,
                                         static_cast<E*>(out))));
}

void PK_BOTTLENECK_NAME(bottleneck_act_backward)(DType dtype, Act act, const void* pre, void* g,
                                                 int64_t rows, int64_t m, float scale,
                                                 void* a_out) {
  PK_LORA_DTYPE_SWITCH("bottleneck_act_backward",
                       PK_BOTTLENECK_ACT_SWITCH((act_backward_loop<D, A>(
                           static_cast<const E*>(pre), static_cast<E*>(g), rows, m, scale,
                           static_cast<E*>(a_out)))));
}

void PK_BOTTLENECK_NAME(bottleneck_column_sum)(DType dtype, const void* x, int64_t rows,
                                               int64_t cols, int64_t col_begin, int64_t col_end,
                                               float* out) {
  PK_LORA_DTYPE_SWITCH("bottleneck_column_sum",
                       (column_sum_loop<D>(static_cast<const E*>(x), rows, cols, col_begin,
                                           col_end, out)));
}

#undef PK_BOTTLENECK_NAME
#undef PK_BOTTLENECK_CAT
#undef PK_BOTTLENECK_CAT2
#undef PK_BOTTLENECK_ACT_SWITCH

}  // namespace pykernels::cpu
