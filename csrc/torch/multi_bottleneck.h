// Multi bottleneck adapter ops (multi_bottleneck.cpp), written once for every
// device over bottleneck.cpp's pipeline; multi_bottleneck_cuda.cpp registers
// them for CUDA.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace pykernels::binding::multi_bottleneck {

std::tuple<at::Tensor, at::Tensor> multi_bottleneck(
    const at::Tensor& h, const std::optional<at::Tensor>& residual, at::TensorList w_down,
    at::TensorList b_down, at::TensorList w_up, at::TensorList b_up, c10::ArrayRef<double> scales,
    const c10::List<std::string>& acts, const at::Tensor& ids, bool save_pre);

std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
           std::vector<at::Tensor>, std::vector<at::Tensor>>
multi_bottleneck_backward(const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& pre,
                          at::TensorList w_down, at::TensorList w_up,
                          c10::ArrayRef<double> scales, const c10::List<std::string>& acts,
                          const at::Tensor& ids, bool need_grad_h, bool add_grad_out);

}  // namespace pykernels::binding::multi_bottleneck
