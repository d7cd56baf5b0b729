// CPU kernels of task_layer_norm: LayerNorm over the last dim with per-task affine weights,
// and its backward (fastmeta/ops/task_layer_norm.py; the backward's own backward is the
// reference's VJP). x is viewed as [T, R, D].
// Grid: forward and grad_x, one work item per row (two passes over its D values: the
// two-pass variance, as task_batch_norm.cpp); grad_γ and grad_β, one per task, summing its
// R rows in row order (deterministic). Memory-bound.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common.h"
#include "cpu_common.h"
#include "eager_nodes.h"

namespace fastmeta {
namespace cpu {
namespace {

struct LnShape {
  int64_t T, R, D;  // x viewed as [T, R, D]
};

LnShape check_ln(const at::Tensor& x, const c10::optional<at::Tensor>& p, const char* name) {
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  TORCH_CHECK_VALUE(x.dim() >= 2, "x must be [T, N, ..., D], got ", x.sizes());
  const int64_t T = x.size(0), D = x.size(-1);
  LnShape s{T, (T * D) ? x.numel() / (T * D) : 0, D};
  if (p.has_value()) {
    FM_CHECK_INPUT(*p, kCPU);
    FM_CHECK_SAME_DTYPE(*p, x);
    TORCH_CHECK_VALUE((p->dim() == 1 && p->size(0) == D) || (p->dim() == 2 && p->size(0) == T && p->size(1) == D),
                      name, " must be [D] or [T, D] with D = ", D, ", got ", p->sizes());
  }
  return s;
}

// The feature row of γ or β for task t (nullptr if absent).
template <typename T>
inline const T* feature_row(const c10::optional<at::Tensor>& p, int64_t t, int64_t D) {
  if (!p.has_value()) return nullptr;
  const T* d = p->data_ptr<T>();
  return p->dim() == 1 ? d : d + t * D;
}

template <typename T>
inline void row_stats(const T* x, int64_t D, double eps, T& mean, T& rstd) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < D; ++i) sum += x[i];
  mean = sum / T(D);
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < D; ++i) sq += (x[i] - mean) * (x[i] - mean);
  rstd = T(1) / std::sqrt(sq / T(D) + T(eps));
}

int64_t row_grain(int64_t D) { return std::max<int64_t>(1, kGrain / std::max<int64_t>(D, 1)); }

at::Tensor task_layer_norm(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                           const c10::optional<at::Tensor>& beta, double eps) {
  const LnShape s = check_ln(x, gamma, "gamma");
  check_ln(x, beta, "beta");
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  dispatch_floating(x.scalar_type(), "task_layer_norm", [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xp = x.data_ptr<T_>();
    T_* yp = y.data_ptr<T_>();
    at::parallel_for(0, s.T * s.R, row_grain(s.D), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t t = r / s.R;
        const T_* xr = xp + r * s.D;
        T_* yr = yp + r * s.D;
        const T_* g = feature_row<T_>(gamma, t, s.D);
        const T_* b = feature_row<T_>(beta, t, s.D);
        T_ mean, rstd;
        row_stats<T_>(xr, s.D, eps, mean, rstd);
        for (int64_t i = 0; i < s.D; ++i) {
          T_ z = (xr[i] - mean) * rstd;  // the reference's order: x̂·γ + β
          if (g) z = z * g[i];
          if (b) z = z + b[i];
          yr[i] = z;
        }
      }
    });
  });
  return y;
}

std::vector<at::Tensor> task_layer_norm_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                 const c10::optional<at::Tensor>& gamma, double eps,
                                                 const c10::List<bool>& needs) {
  const LnShape s = check_ln(x, gamma, "gamma");
  FM_CHECK_INPUT(grad_y, kCPU);
  FM_CHECK_SAME_DTYPE(grad_y, x);
  TORCH_CHECK_VALUE(grad_y.sizes() == x.sizes(), "grad_y must be ", x.sizes(), ", got ", grad_y.sizes());
  TORCH_CHECK_VALUE(needs.size() == 3, "needs must hold 3 flags, got ", needs.size());
  const bool need_x = needs.get(0), need_gamma = needs.get(1), need_beta = needs.get(2);
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need_x ? at::empty_like(x) : empty();
  at::Tensor gg = need_gamma ? at::empty({s.T, s.D}, x.options()) : empty();
  at::Tensor gb = need_beta ? at::empty({s.T, s.D}, x.options()) : empty();
  dispatch_floating(x.scalar_type(), "task_layer_norm_backward", [&](auto tag_) {
    using T_ = decltype(tag_);
    const T_* xp = x.data_ptr<T_>();
    const T_* gy = grad_y.data_ptr<T_>();
    if (need_x && x.numel()) {
      T_* gxp = gx.data_ptr<T_>();
      at::parallel_for(0, s.T * s.R, row_grain(s.D), [&](int64_t r0, int64_t r1) {
        std::vector<T_> g(s.D);
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t t = r / s.R;
          const T_* xr = xp + r * s.D;
          const T_* gyr = gy + r * s.D;
          const T_* gam = feature_row<T_>(gamma, t, s.D);
          T_ mean, rstd;
          row_stats<T_>(xr, s.D, eps, mean, rstd);
          T_ sum_g = 0, sum_gx = 0;  // Σ g and Σ g·x̂, g = grad_y·γ
          for (int64_t i = 0; i < s.D; ++i) {
            g[i] = gam ? gyr[i] * gam[i] : gyr[i];
            sum_g += g[i];
            sum_gx += g[i] * (xr[i] - mean) * rstd;
          }
          const T_ mg = sum_g / T_(s.D), mgx = sum_gx / T_(s.D);
          T_* out = gxp + r * s.D;
          for (int64_t i = 0; i < s.D; ++i) out[i] = rstd * (g[i] - mg - (xr[i] - mean) * rstd * mgx);
        }
      });
    }
    if (need_gamma || need_beta) {
      T_* ggp = need_gamma ? gg.data_ptr<T_>() : nullptr;
      T_* gbp = need_beta ? gb.data_ptr<T_>() : nullptr;
      // Tasks per chunk: below kGrain values a fork/join costs more than the sums (W1's
      // 25 tasks of 10 × 40 values: 5 ms with one task per chunk on a loaded 2-core box,
      // against 0.5 ms for the whole reference step).
      const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(s.R * s.D, 1));
      at::parallel_for(0, s.T, grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          T_* acc_g = ggp ? ggp + t * s.D : nullptr;
          T_* acc_b = gbp ? gbp + t * s.D : nullptr;
          for (int64_t i = 0; i < s.D; ++i) {
            if (acc_g) acc_g[i] = T_(0);
            if (acc_b) acc_b[i] = T_(0);
          }
          for (int64_t r = t * s.R; r < (t + 1) * s.R; ++r) {
            const T_* xr = xp + r * s.D;
            const T_* gyr = gy + r * s.D;
            T_ mean, rstd;
            row_stats<T_>(xr, s.D, eps, mean, rstd);
            for (int64_t i = 0; i < s.D; ++i) {
              if (acc_g) acc_g[i] += gyr[i] * (xr[i] - mean) * rstd;
              if (acc_b) acc_b[i] += gyr[i];
            }
          }
        }
      });
    }
  });
  return {gx, gg, gb};
}

// ---------------------------------------------------------------------------------------
// task_layer_norm's autograd node in C++ (see "The eager path's autograd nodes in C++" in
// task_conv2d.cpp): what fastmeta/ops/task_layer_norm.py's Python node does, the backward
// kernel called by autograd's engine directly, γ's and β's gradients summed over the tasks
// where they are shared. Where the backward itself records (second order), the public
// task_layer_norm_backward, whose own backward is the reference's VJP.
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

// γ or β as the launchers give them to the kernels (fastmeta/backends/table.py's
// shared_or_contiguous): a task stride of 0 → the shared row; anything else contiguous.
c10::optional<at::Tensor> shared_or_contiguous(const at::Tensor& t) {
  if (!t.defined()) return c10::nullopt;
  if (t.dim() >= 2 && t.size(0) > 1 && t.stride(0) == 0) return t.select(0, 0).contiguous();
  return t.contiguous();
}

struct TaskLayerNormNode : public torch::autograd::Function<TaskLayerNormNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                               const c10::optional<at::Tensor>& beta, double eps) {
    ctx->set_materialize_grads(false);
    const at::Tensor g = gamma.value_or(at::Tensor()), b = beta.value_or(at::Tensor());
    ctx->save_for_backward({x, g});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["gamma_dim"] = g.defined() ? g.dim() : int64_t(0);
    ctx->saved_data["beta_dim"] = b.defined() ? b.dim() : int64_t(0);
    ctx->saved_data["edges"] = edge_indices({true, gamma.has_value(), beta.has_value()});
    return {recorded(nullptr, "fastmeta_ext::task_layer_norm", [&] {
      return task_layer_norm(x.contiguous(), shared_or_contiguous(g), shared_or_contiguous(b), eps);
    })};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none, &grad_y = grads[0];
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const int64_t gamma_dim = ctx->saved_data["gamma_dim"].toInt(), beta_dim = ctx->saved_data["beta_dim"].toInt();
    const bool need_x = needs_grad(ctx, edges[0]), need_gamma = gamma_dim > 0 && needs_grad(ctx, edges[1]),
               need_beta = beta_dim > 0 && needs_grad(ctx, edges[2]);
    // One per forward argument: x, gamma, beta, eps.
    if (!grad_y.defined() || !(need_x || need_gamma || need_beta)) return {none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &gamma = saved[1];
    const double eps = ctx->saved_data["eps"].toDouble();
    const c10::List<bool> needs = bool_list({need_x, need_gamma, need_beta});
    std::vector<at::Tensor> out;
    if (at::GradMode::is_enabled()) {
      static const c10::OperatorHandle op =
          c10::Dispatcher::singleton().findSchemaOrThrow("fastmeta::task_layer_norm_backward", "");
      out = call_public_op(op, {grad_y, x, maybe(gamma), eps, needs})[0].toTensorVector();
    } else {
      out = recorded("fastmeta::task_layer_norm_backward", "fastmeta_ext::task_layer_norm_backward", [&] {
        return task_layer_norm_backward(grad_y.contiguous(), x.contiguous(), shared_or_contiguous(gamma), eps, needs);
      });
    }
    at::Tensor grad_x = need_x ? out[0] : none, grad_gamma = need_gamma ? out[1] : none,
               grad_beta = need_beta ? out[2] : none;
    if (need_gamma && gamma_dim == 1) grad_gamma = grad_gamma.sum(0);
    if (need_beta && beta_dim == 1) grad_beta = grad_beta.sum(0);
    return {grad_x, grad_gamma, grad_beta, none};
  }
};

std::vector<at::Tensor> task_layer_norm_node(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                                             const c10::optional<at::Tensor>& beta, double eps) {
  return TaskLayerNormNode::apply(x, gamma, beta, eps);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("task_layer_norm", &fastmeta::cpu::task_layer_norm);
  m.impl("task_layer_norm_backward", &fastmeta::cpu::task_layer_norm_backward);
}

// The eager node's entry (see task_conv2d_node in task_conv2d.cpp).
TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("task_layer_norm_node(Tensor x, Tensor? gamma, Tensor? beta, float eps) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("task_layer_norm_node", &fastmeta::cpu::task_layer_norm_node);
}
