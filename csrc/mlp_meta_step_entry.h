// The table's kernels of the fused MLP meta-step (fastmeta/ops/mlp_meta_step.py, and the
// whole-step update of fastmeta/ops/mlp_meta_step_update.py), on top of
// a device's core `Core(theta, ..., grads, loss_weights)` that reads θ as one flat buffer:
//
//   mlp_meta_step_with_task_gradients
//                             the forward: (mean loss, losses, preds, and, when asked, every
//                             task's meta-gradient [T, P] and [T, *lr.shape]: grads mode 2,
//                             and the non-finite finding when asked to validate);
//   mlp_meta_step_backward    Σ_t w_t · dloss_t/d(params, lr), w_t = grad_losses[t] +
//                             grad_mean / T (grads mode 1), per parameter;
//   mlp_meta_step_weigh_task_gradients
//                             the same Σ from the forward's per-task gradients.
//
// They take the model's parameters as a list (no concatenation in Python, so no cat/split per
// iteration) and return per-parameter gradients. On the CPU the list is gathered and the
// gradients split with memcpy and loops: no aten op, so no dispatch (a plain W1 step is then
// 4 dispatches: this forward, autograd's seed, the weighing, the fused Adam). One definition
// for the CPU and CUDA registrations.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mean.h>
#include <ATen/ops/mv.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <tuple>
#include <vector>

#include "common.h"

namespace fastmeta {

// What the forward found non-finite when asked to validate: its last output, int64 [3] on
// the CPU = (kind, task, argument), all 0 when nothing was. The op raises
// FloatingPointError from it (fastmeta/ops/mlp_meta_step.py, raise_nonfinite), on every
// backend alike. A code, not an exception: torch has no C++ error that reaches Python as
// FloatingPointError, and the Python side must not parse message text. The numbering is
// mirrored there (NONFINITE_*).
enum class NonFinite : int64_t { None = 0, Input = 1, QueryLoss = 2 };
// The argument of a NonFinite::Input finding, in the order they are checked.
enum class NonFiniteArgument : int64_t { SupportX = 0, QueryX = 1, SupportY = 2, QueryY = 3, None = -1 };

inline void report_nonfinite(int64_t* nonfinite, NonFinite kind, int64_t task, NonFiniteArgument argument) {
  if (nonfinite[0] != 0) return;  // the first finding wins
  nonfinite[0] = static_cast<int64_t>(kind);
  nonfinite[1] = task;
  nonfinite[2] = static_cast<int64_t>(argument);
}

// A device's core: (losses, preds, dθ, dlr). The last argument is where it reports a
// non-finite input or loss (null: it does not check; the CUDA core never does, as that
// would sync the device).
using MlpMetaStepCore = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, at::IntArrayRef, c10::string_view, double, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, c10::string_view, const at::Tensor&, int64_t, bool, int64_t,
    const c10::optional<at::Tensor>&, int64_t*);

namespace mlp_entry {

inline void check_params(at::TensorList params) {
  TORCH_CHECK_VALUE(!params.empty(), "params must hold the MLP's weights and biases");
  for (const auto& p : params) {
    TORCH_CHECK_VALUE(p.device() == params[0].device(), "params must share one device: ", params[0].device(),
                      " and ", p.device());
    TORCH_CHECK_TYPE(p.scalar_type() == params[0].scalar_type(), "params must share one dtype: ",
                     params[0].scalar_type(), " and ", p.scalar_type());
    TORCH_CHECK_VALUE(p.is_contiguous(), "params must be contiguous");
  }
}

// θ as one flat buffer, in the order of the list (named_parameters order).
inline at::Tensor gather(at::TensorList params) {
  check_params(params);
  if (!params[0].is_cpu()) {  // one device copy (CUDA), of the parameters' flat views
    std::vector<at::Tensor> flat;
    flat.reserve(params.size());
    for (const auto& p : params) flat.push_back(p.view({-1}));
    return at::cat(flat);
  }
  int64_t P = 0;
  for (const auto& p : params) P += p.numel();
  at::Tensor theta = at::empty({P}, params[0].options());
  char* dst = static_cast<char*>(theta.data_ptr());
  for (const auto& p : params) {
    const size_t bytes = static_cast<size_t>(p.numel()) * p.element_size();
    std::memcpy(dst, p.data_ptr(), bytes);
    dst += bytes;
  }
  return theta;
}

// A flat [P] gradient as one tensor per parameter, shaped like it (fresh storage each: a
// custom op's outputs must not alias).
inline std::vector<at::Tensor> scatter(const at::Tensor& flat, at::TensorList params) {
  std::vector<at::Tensor> out;
  out.reserve(params.size() + 1);
  int64_t offset = 0;
  for (const auto& p : params) {
    if (flat.is_cpu()) {
      at::Tensor g = at::empty(p.sizes(), flat.options());
      std::memcpy(g.data_ptr(), static_cast<const char*>(flat.data_ptr()) + offset * flat.element_size(),
                  static_cast<size_t>(p.numel()) * flat.element_size());
      out.push_back(g);
    } else {
      out.push_back(flat.narrow(0, offset, p.numel()).view(p.sizes()).clone());
    }
    offset += p.numel();
  }
  return out;
}

// w_t = grad_losses[t] + grad_mean / T: the weight of task t's gradient in the backward.
inline at::Tensor loss_weights(const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_losses,
                               int64_t T, const at::Tensor& like) {
  at::Tensor w = at::empty({T}, like.options());
  if (!like.is_cpu()) {
    w.zero_();
    if (grad_losses.has_value()) w.add_(*grad_losses);
    if (grad_mean.has_value()) w.add_(grad_mean->reshape({}), 1.0 / static_cast<double>(T));
    return w;
  }
  dispatch_floating(like.scalar_type(), "mlp_meta_step loss weights", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t m = grad_mean.has_value() ? grad_mean->contiguous().data_ptr<scalar_t>()[0] / scalar_t(T)
                                             : scalar_t(0);
    const scalar_t* gl = grad_losses.has_value() ? grad_losses->data_ptr<scalar_t>() : nullptr;
    for (int64_t t = 0; t < T; ++t) wp[t] = (gl ? gl[t] : scalar_t(0)) + m;
  });
  return w;
}

inline void check_upstream(const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_losses,
                           int64_t T, const at::Tensor& like) {
  if (grad_mean.has_value()) {
    TORCH_CHECK_TYPE(grad_mean->scalar_type() == like.scalar_type(), "grad_mean must be ", like.scalar_type(),
                     " like θ, got ", grad_mean->scalar_type());
    TORCH_CHECK_VALUE(grad_mean->numel() == 1 && grad_mean->device() == like.device(),
                      "grad_mean must be one value on ", like.device(), ", got shape ", grad_mean->sizes(), " on ",
                      grad_mean->device());
  }
  if (grad_losses.has_value()) {
    TORCH_CHECK_TYPE(grad_losses->scalar_type() == like.scalar_type(), "grad_losses must be ", like.scalar_type(),
                     " like θ, got ", grad_losses->scalar_type());
    TORCH_CHECK_VALUE(grad_losses->dim() == 1 && grad_losses->size(0) == T && grad_losses->is_contiguous() &&
                          grad_losses->device() == like.device(),
                      "grad_losses must be contiguous [T] = [", T, "] on ", like.device(), ", got shape ",
                      grad_losses->sizes(), " on ", grad_losses->device());
  }
}

}  // namespace mlp_entry

template <MlpMetaStepCore Core>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step_with_task_gradients(
    at::TensorList params, at::IntArrayRef layer_sizes, c10::string_view act, double negative_slope,
    const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    c10::string_view loss_kind, const at::Tensor& lr, int64_t steps, bool first_order, bool task_gradients,
    bool validate) {
  const at::Tensor theta = mlp_entry::gather(params);
  at::Tensor nonfinite = at::empty({3}, at::TensorOptions().dtype(at::kLong));  // on the CPU: the host reads it
  int64_t* found = nonfinite.data_ptr<int64_t>();
  found[0] = found[1] = found[2] = 0;
  auto [losses, preds, g_theta, g_lr] = Core(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x,
                                             query_y, loss_kind, lr, steps, first_order, task_gradients ? 2 : 0,
                                             c10::nullopt, validate ? found : nullptr);
  at::Tensor mean = at::empty({}, losses.options());
  if (losses.is_cpu()) {
    dispatch_floating(losses.scalar_type(), "mlp_meta_step mean", [&](auto tag_) {
      using scalar_t = decltype(tag_);
      const scalar_t* l = losses.data_ptr<scalar_t>();
      scalar_t sum = 0;
      for (int64_t t = 0; t < losses.numel(); ++t) sum += l[t];  // task order: deterministic
      mean.data_ptr<scalar_t>()[0] = sum / static_cast<scalar_t>(losses.numel());
    });
  } else {
    at::mean_out(mean, losses, at::IntArrayRef{0});
  }
  return {mean, losses, preds, g_theta, g_lr, nonfinite};
}

template <MlpMetaStepCore Core>
std::vector<at::Tensor> mlp_meta_step_backward(
    const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_losses, at::TensorList params,
    at::IntArrayRef layer_sizes, c10::string_view act, double negative_slope, const at::Tensor& support_x,
    const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y, c10::string_view loss_kind,
    const at::Tensor& lr, int64_t steps, bool first_order, const c10::List<bool>& needs) {
  TORCH_CHECK_VALUE(needs.size() == 2, "needs must hold 2 flags (params, lr), got ", needs.size());
  const at::Tensor theta = mlp_entry::gather(params);
  const int64_t T = support_x.size(0);
  mlp_entry::check_upstream(grad_mean, grad_losses, T, theta);
  const at::Tensor w = mlp_entry::loss_weights(grad_mean, grad_losses, T, theta);
  auto [losses, preds, d_theta, d_lr] = Core(theta, layer_sizes, act, negative_slope, support_x, support_y, query_x,
                                             query_y, loss_kind, lr, steps, first_order, 1, w, nullptr);
  std::vector<at::Tensor> out = needs.get(0) ? mlp_entry::scatter(d_theta, params) : std::vector<at::Tensor>{};
  if (!needs.get(0))
    for (size_t i = 0; i < params.size(); ++i) out.push_back(at::empty({0}, theta.options()));
  out.push_back(needs.get(1) ? d_lr : at::empty({0}, lr.options()));
  return out;
}

// Σ_t w_t · g_t for the forward's per-task gradients g [T, P] and glr [T, *lr.shape].
inline std::vector<at::Tensor> mlp_meta_step_weigh_task_gradients(
    const c10::optional<at::Tensor>& grad_mean, const c10::optional<at::Tensor>& grad_losses,
    const at::Tensor& task_grad_theta, const at::Tensor& task_grad_lr, at::TensorList params) {
  TORCH_CHECK_VALUE(task_grad_theta.dim() == 2 && task_grad_theta.is_contiguous() && task_grad_lr.is_contiguous(),
              "task gradients must be contiguous [T, P] and [T, ...]");
  const int64_t T = task_grad_theta.size(0), P = task_grad_theta.size(1);
  TORCH_CHECK_VALUE(task_grad_lr.dim() >= 1 && task_grad_lr.size(0) == T, "task_grad_lr must be [T, ...]");
  int64_t numel = 0;
  for (const auto& p : params) numel += p.numel();
  TORCH_CHECK_VALUE(numel == P, "params hold ", numel, " values, the task gradients ", P);
  mlp_entry::check_upstream(grad_mean, grad_losses, T, task_grad_theta);
  const at::Tensor w = mlp_entry::loss_weights(grad_mean, grad_losses, T, task_grad_theta);
  std::vector<int64_t> lr_shape(task_grad_lr.sizes().begin() + 1, task_grad_lr.sizes().end());
  at::Tensor g_theta, g_lr;
  if (task_grad_theta.is_cpu()) {
    g_theta = at::empty({P}, task_grad_theta.options());
    g_lr = at::empty(lr_shape, task_grad_lr.options());
    dispatch_floating(task_grad_theta.scalar_type(), "mlp_meta_step_weigh_task_gradients", [&](auto tag_) {
      using scalar_t = decltype(tag_);
      const scalar_t* wp = w.data_ptr<scalar_t>();
      for (auto [src, dst] : {std::pair{&task_grad_theta, &g_theta}, std::pair{&task_grad_lr, &g_lr}}) {
        const int64_t n = dst->numel();
        const scalar_t* sp = src->template data_ptr<scalar_t>();
        scalar_t* dp = dst->template data_ptr<scalar_t>();
        for (int64_t k = 0; k < n; ++k) dp[k] = 0;
        for (int64_t t = 0; t < T; ++t) {  // task order: deterministic
          const scalar_t wt = wp[t];
#pragma omp simd
          for (int64_t k = 0; k < n; ++k) dp[k] += wt * sp[t * n + k];
        }
      }
    });
  } else {
    g_theta = at::mv(task_grad_theta.t(), w);
    g_lr = at::mv(task_grad_lr.reshape({T, -1}).t(), w).view(lr_shape);
  }
  std::vector<at::Tensor> out = mlp_entry::scatter(g_theta, params);
  out.push_back(g_lr);
  return out;
}

// One meta-iteration on the mean query loss and torch's fused Adam step, in place (CPU: the
// steps are incremented and the non-finite flag read on the host, so the whole call is one
// dispatch plus the fused Adam inside it, with no sync). See reference_mlp_meta_step_update.
template <MlpMetaStepCore Core>
std::tuple<at::Tensor, at::Tensor> mlp_meta_step_update(
    at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList state_steps,
    const at::Tensor& nonfinite, int64_t iteration, at::IntArrayRef layer_sizes, c10::string_view act,
    double negative_slope, const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x,
    const at::Tensor& query_y, c10::string_view loss_kind, const at::Tensor& lr, int64_t steps, bool first_order,
    double adam_lr, double beta1, double beta2, double weight_decay, double eps) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n,
              "params, exp_avgs, exp_avg_sqs and state_steps must have one tensor per parameter");
  TORCH_CHECK_TYPE(nonfinite.scalar_type() == at::kLong, "nonfinite must be int64, got ", nonfinite.scalar_type());
  TORCH_CHECK_VALUE(nonfinite.is_cpu() && nonfinite.dim() == 1 && nonfinite.size(0) == 2 && nonfinite.is_contiguous(),
                    "nonfinite must be a contiguous CPU tensor [2] (flag, iteration), got shape ", nonfinite.sizes(),
                    " on ", nonfinite.device());
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(params[i].is_cpu() && state_steps[i].is_cpu() && state_steps[i].numel() == 1,
                "mlp_meta_step_update runs on the CPU, with one-value step tensors");
    TORCH_CHECK_VALUE(exp_avgs[i].sizes() == params[i].sizes() && exp_avg_sqs[i].sizes() == params[i].sizes(),
                "the optimizer state must be shaped like its parameter");
  }
  const at::Tensor theta = mlp_entry::gather(params);
  const int64_t T = support_x.size(0);
  // A sampler's support and query sets are often views of one tensor: the kernel reads
  // dense rows (no copy when they already are).
  const at::Tensor sx = support_x.contiguous(), sy = support_y.contiguous();
  const at::Tensor qx = query_x.contiguous(), qy = query_y.contiguous();
  at::Tensor w = at::empty({T}, theta.options());
  at::Tensor mean = at::empty({}, theta.options());
  at::Tensor losses, d_theta;
  bool finite = true;
  dispatch_floating(theta.scalar_type(), "mlp_meta_step_update", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    scalar_t* wp = w.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) wp[t] = scalar_t(1) / scalar_t(T);
    auto out = Core(theta, layer_sizes, act, negative_slope, sx, sy, qx, qy, loss_kind, lr.contiguous(), steps,
                    first_order, 1, w, nullptr);
    losses = std::get<0>(out);
    d_theta = std::get<2>(out);
    const scalar_t* l = losses.data_ptr<scalar_t>();
    scalar_t sum = 0;
    for (int64_t t = 0; t < T; ++t) {
      sum += l[t];
      finite = finite && std::isfinite(l[t]);
    }
    mean.data_ptr<scalar_t>()[0] = sum / scalar_t(T);
    const scalar_t* g = d_theta.data_ptr<scalar_t>();
    for (int64_t k = 0; k < d_theta.numel() && finite; ++k) finite = std::isfinite(g[k]);
  });
  if (!finite) {
    int64_t* f = nonfinite.data_ptr<int64_t>();
    if (f[0] == 0) {
      f[0] = 1;
      f[1] = iteration;
    }
    return {mean, losses};
  }
  const std::vector<at::Tensor> grads = mlp_entry::scatter(d_theta, params);
  for (const auto& step : state_steps) {
    dispatch_floating(step.scalar_type(), "mlp_meta_step_update step", [&](auto tag_) {
      using scalar_t = decltype(tag_);
      step.data_ptr<scalar_t>()[0] += scalar_t(1);
    });
  }
  at::_fused_adam_(params, grads, exp_avgs, exp_avg_sqs, at::TensorList{}, state_steps, adam_lr, beta1, beta2,
                   weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false, c10::nullopt, c10::nullopt);
  return {mean, losses};
}

}  // namespace fastmeta
