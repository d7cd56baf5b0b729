// The table's two kernels of the fused MLP meta-step (fastmeta/ops/mlp_meta_step.py), on top
// of a device's core `Core(..., grads, task_weights)`: the forward, with every task's
// meta-gradient when asked (grads mode 2), and the backward, Σ_t w_t · that gradient (mode
// 1). One definition for the CPU and CUDA registrations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/core/List.h>
#include <c10/util/Exception.h>

#include <tuple>
#include <vector>

namespace fastmeta {

using MlpMetaStepCore = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, at::IntArrayRef, c10::string_view, double, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::string_view, const at::Tensor&, int64_t, bool, int64_t,
    const c10::optional<at::Tensor>&);

template <MlpMetaStepCore Core>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step_forward(
    const at::Tensor& theta, at::IntArrayRef layer_sizes, c10::string_view act, double negative_slope,
    const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    c10::string_view loss_kind, const at::Tensor& lr, int64_t steps, bool first_order, bool task_gradients) {
  return Core(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x, query_y, loss_kind, lr, steps,
              first_order, task_gradients ? 2 : 0, c10::nullopt);
}

template <MlpMetaStepCore Core>
std::vector<at::Tensor> mlp_meta_step_backward(const at::Tensor& grad_losses, const at::Tensor& theta,
                                               at::IntArrayRef layer_sizes, c10::string_view act,
                                               double negative_slope, const at::Tensor& support_x,
                                               const at::Tensor& support_y, const at::Tensor& query_x,
                                               const at::Tensor& query_y, c10::string_view loss_kind,
                                               const at::Tensor& lr, int64_t steps, bool first_order,
                                               const c10::List<bool>& needs) {
  TORCH_CHECK(needs.size() == 2, "needs must hold 2 flags, got ", needs.size());
  auto [losses, preds, d_theta, d_lr] = Core(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x,
                                             query_y, loss_kind, lr, steps, first_order, 1, grad_losses);
  return {needs.get(0) ? d_theta : at::empty({0}, theta.options()), needs.get(1) ? d_lr : at::empty({0}, lr.options())};
}

}  // namespace fastmeta
