// CPU kernels of task_loss, task_loss_grad and task_loss_grad_backward: one pass over
// [T, N, K], parallel over tasks.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/neg.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "../common.h"
#include "cpu_common.h"
#include "eager_nodes.h"
#include "../log_sum_exp.h"

namespace fastmeta {
namespace cpu {
namespace {

// Shapes of task_loss: pred [T, N, K]; cross-entropy target int64 [T, N]; MSE target the
// shape of pred (any trailing dims, flattened to [T, M] here).
void check_loss_args(const at::Tensor& pred, const at::Tensor& target, LossKind kind) {
  FM_CHECK_INPUT(pred, kCPU);
  FM_CHECK_INPUT(target, kCPU);
  FM_CHECK_FLOATING(pred);
  TORCH_CHECK_VALUE(pred.dim() >= 2 && pred.size(0) > 0, "pred must be [T, N, ...], got ", pred.sizes());
  if (kind == LossKind::CrossEntropy) {
    FM_CHECK_DIM(pred, 3);
    TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "cross-entropy target must be int64, got ", target.scalar_type());
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == pred.size(0) && target.size(1) == pred.size(1),
                "cross-entropy target must be [T, N] = [", pred.size(0), ", ", pred.size(1), "], got ",
                target.sizes());
    const int64_t C = pred.size(2);
    const int64_t* y = target.data_ptr<int64_t>();
    for (int64_t i = 0; i < target.numel(); ++i)  // a label out of range would read past the row
      TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < C, "target label ", y[i], " is not in [0, ", C, ")");
  } else {
    FM_CHECK_SAME_DTYPE(pred, target);
    TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "MSE target must be ", pred.sizes(), ", got ", target.sizes());
  }
}

// The grain of a parallel loop over tasks of `elements` values each: about kGrain values a
// work item.
inline int64_t per_task_grain(int64_t elements) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(elements, 1));
}

// One task's MSE loss, the mean of (pred − target)²: the one formula of task_loss and
// task_loss_and_grad (their losses equal bit for bit).
template <typename scalar_t>
inline scalar_t mse_task_loss(const scalar_t* zt, const scalar_t* yt, int64_t M) {
  scalar_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < M; ++i) acc += (zt[i] - yt[i]) * (zt[i] - yt[i]);
  return acc / scalar_t(M);
}

at::Tensor task_loss(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss_args(pred, target, kind);
  const int64_t T = pred.size(0), N = pred.size(1);
  const int64_t M = pred.numel() / T;  // elements per task
  at::Tensor out = at::empty({T}, pred.options());
  dispatch_floating(pred.scalar_type(), "task_loss", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* z = pred.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, per_task_grain(M), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (kind == LossKind::CrossEntropy) {
          const int64_t C = pred.size(2);
          const int64_t* y = target.data_ptr<int64_t>() + t * N;
          scalar_t acc = 0;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* row = z + (t * N + n) * C;
            acc += log_sum_exp<scalar_t>(row, C) - row[y[n]];
          }
          o[t] = acc / scalar_t(N);
        } else {
          o[t] = mse_task_loss<scalar_t>(z + t * M, target.data_ptr<scalar_t>() + t * M, M);
        }
      }
    });
  });
  return out;
}

// One cross-entropy row's gradient, (softmax − one-hot) / N, into orow; returns the row's
// log-sum-exp (the loss needs it too). The one formula of task_loss_grad and
// task_loss_and_grad.
template <typename scalar_t>
inline scalar_t cross_entropy_row_grad(const scalar_t* row, int64_t C, int64_t label, scalar_t inv_n,
                                       scalar_t* orow) {
  const scalar_t lse = log_sum_exp<scalar_t>(row, C);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) orow[c] = std::exp(row[c] - lse) * inv_n;
  orow[label] -= inv_n;
  return lse;
}

// One task's MSE gradient, 2 (pred − target) / M, into ot.
template <typename scalar_t>
inline void mse_task_grad(const scalar_t* zt, const scalar_t* yt, int64_t M, scalar_t* ot) {
  const scalar_t two_over_m = scalar_t(2) / scalar_t(M);
#pragma omp simd
  for (int64_t i = 0; i < M; ++i) ot[i] = (zt[i] - yt[i]) * two_over_m;
}

// scale: a [T] of pred's dtype (task stride 0 or 1) multiplying each task's gradient, or
// none: task_loss's backward hands its upstream here instead of multiplying after.
at::Tensor task_loss_grad(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind_name,
                          const c10::optional<at::Tensor>& scale) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss_args(pred, target, kind);
  const int64_t T = pred.size(0), N = pred.size(1);
  const int64_t M = pred.numel() / T;
  const bool scaled = scale.has_value() && scale->defined();
  if (scaled) {
    TORCH_CHECK_VALUE(scale->device().is_cpu() && scale->scalar_type() == pred.scalar_type() && scale->dim() == 1 &&
                          scale->size(0) == T && (T <= 1 || scale->stride(0) == 0 || scale->stride(0) == 1),
                      "task_loss_grad: scale must be a CPU [T] = [", T, "] of pred's dtype at a task stride of 0 or 1, "
                      "got ", scale->sizes(), " with strides ", scale->strides());
  }
  const int64_t scale_stride = scaled && T > 1 ? scale->stride(0) : 0;
  at::Tensor out = at::empty_like(pred);
  dispatch_floating(pred.scalar_type(), "task_loss_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* z = pred.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* sc = scaled ? scale->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, T, per_task_grain(M), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        // The reference's order: the unscaled gradient rounded, then times the task's scale.
        const scalar_t s = sc ? sc[t * scale_stride] : scalar_t(1);
        if (kind == LossKind::CrossEntropy) {
          const int64_t C = pred.size(2);
          const int64_t* y = target.data_ptr<int64_t>() + t * N;
          const scalar_t inv_n = scalar_t(1) / scalar_t(N);
          for (int64_t n = 0; n < N; ++n) {
            scalar_t* orow = o + (t * N + n) * C;
            cross_entropy_row_grad<scalar_t>(z + (t * N + n) * C, C, y[n], inv_n, orow);
            if (sc) {
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) orow[c] *= s;
            }
          }
        } else {
          scalar_t* ot = o + t * M;
          mse_task_grad<scalar_t>(z + t * M, target.data_ptr<scalar_t>() + t * M, M, ot);
          if (sc) {
#pragma omp simd
            for (int64_t i = 0; i < M; ++i) ot[i] *= s;
          }
        }
      }
    });
  });
  return out;
}

// The VJP of task_loss_grad w.r.t. pred: cross-entropy p ⊙ (u − Σ_k p_k u_k) / N per row,
// p = softmax(pred); MSE u · 2 / (N·D). Neither reads the target (it was checked by the
// forward that saved it; its shape is checked here).
at::Tensor task_loss_grad_backward(const at::Tensor& upstream, const at::Tensor& pred, const at::Tensor& target,
                                   c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  FM_CHECK_INPUT(upstream, kCPU);
  FM_CHECK_INPUT(pred, kCPU);
  FM_CHECK_INPUT(target, kCPU);
  FM_CHECK_FLOATING(pred);
  FM_CHECK_SAME_DTYPE(upstream, pred);
  TORCH_CHECK_VALUE(pred.dim() >= 2 && pred.size(0) > 0, "pred must be [T, N, ...], got ", pred.sizes());
  TORCH_CHECK_VALUE(upstream.sizes() == pred.sizes(), "upstream must be ", pred.sizes(), ", got ", upstream.sizes());
  if (kind == LossKind::CrossEntropy) {
    FM_CHECK_DIM(pred, 3);
    TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == pred.size(0) && target.size(1) == pred.size(1),
                      "cross-entropy target must be [T, N] = [", pred.size(0), ", ", pred.size(1), "], got ",
                      target.sizes());
  } else {
    TORCH_CHECK_VALUE(target.sizes() == pred.sizes(), "MSE target must be ", pred.sizes(), ", got ", target.sizes());
  }
  const int64_t T = pred.size(0), N = pred.size(1);
  const int64_t M = pred.numel() / T;
  at::Tensor out = at::empty_like(pred);
  if (out.numel() == 0) return out;
  dispatch_floating(pred.scalar_type(), "task_loss_grad_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* z = pred.data_ptr<scalar_t>();
    const scalar_t* u = upstream.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, per_task_grain(M), [&](int64_t t0, int64_t t1) {
      if (kind == LossKind::CrossEntropy) {
        const int64_t C = pred.size(2);
        const scalar_t inv_n = scalar_t(1) / scalar_t(N);
        for (int64_t row = t0 * N; row < t1 * N; ++row) {
          const scalar_t* zr = z + row * C;
          const scalar_t* ur = u + row * C;
          scalar_t* orow = o + row * C;
          const scalar_t lse = log_sum_exp<scalar_t>(zr, C);
          scalar_t pu = 0;  // Σ_k p_k u_k, with p_k kept in orow
#pragma omp simd reduction(+ : pu)
          for (int64_t c = 0; c < C; ++c) {
            orow[c] = std::exp(zr[c] - lse);
            pu += orow[c] * ur[c];
          }
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) orow[c] = orow[c] * (ur[c] - pu) * inv_n;
        }
      } else {
        const scalar_t scale = scalar_t(2) / scalar_t(M);
#pragma omp simd
        for (int64_t i = t0 * M; i < t1 * M; ++i) o[i] = u[i] * scale;
      }
    });
  });
  return out;
}

// task_accuracy: per task, the share of its N rows whose largest logit (the first of equals;
// a NaN counts as the largest, as torch.argmax has it) is the target class, in pred's dtype.
// One pass over [T, N, K], parallel over tasks; a label outside [0, K) is never a hit.
at::Tensor task_accuracy(const at::Tensor& pred, const at::Tensor& target) {
  FM_CHECK_INPUT(pred, kCPU);
  FM_CHECK_INPUT(target, kCPU);
  FM_CHECK_FLOATING(pred);
  FM_CHECK_DIM(pred, 3);
  TORCH_CHECK_VALUE(pred.size(2) > 0, "pred must have at least one class, got ", pred.sizes());
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, "target must be int64, got ", target.scalar_type());
  TORCH_CHECK_VALUE(target.dim() == 2 && target.size(0) == pred.size(0) && target.size(1) == pred.size(1),
                    "target must be [T, N] = [", pred.size(0), ", ", pred.size(1), "], got ", target.sizes());
  const int64_t T = pred.size(0), N = pred.size(1), C = pred.size(2);
  at::Tensor out = at::empty({T}, pred.options());
  dispatch_floating(pred.scalar_type(), "task_accuracy", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* z = pred.data_ptr<scalar_t>();
    const int64_t* y = target.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, per_task_grain(N * C), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t hits = 0;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* row = z + (t * N + n) * C;
          int64_t best = 0;
          for (int64_t c = 1; c < C && !std::isnan(row[best]); ++c)
            if (std::isnan(row[c]) || row[c] > row[best]) best = c;
          hits += best == y[t * N + n];
        }
        o[t] = static_cast<scalar_t>(hits) / static_cast<scalar_t>(N);
      }
    });
  });
  return out;
}

// task_loss_and_accuracy: the cross-entropy task_loss and task_accuracy of one [T, N, K] in
// one pass: per row its log-sum-exp and its first largest logit together, each summed over
// the task's rows in the order of the two ops' own loops (so both outputs equal theirs bit
// for bit). Labels are checked as task_loss's (a label outside [0, K) raises).
std::tuple<at::Tensor, at::Tensor> task_loss_and_accuracy(const at::Tensor& pred, const at::Tensor& target) {
  check_loss_args(pred, target, LossKind::CrossEntropy);
  const int64_t T = pred.size(0), N = pred.size(1), C = pred.size(2);
  TORCH_CHECK_VALUE(C > 0, "pred must have at least one class, got ", pred.sizes());
  at::Tensor loss = at::empty({T}, pred.options());
  at::Tensor accuracy = at::empty({T}, pred.options());
  dispatch_floating(pred.scalar_type(), "task_loss_and_accuracy", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* z = pred.data_ptr<scalar_t>();
    const int64_t* y = target.data_ptr<int64_t>();
    scalar_t* lo = loss.data_ptr<scalar_t>();
    scalar_t* ao = accuracy.data_ptr<scalar_t>();
    at::parallel_for(0, T, per_task_grain(N * C), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t acc = 0;
        int64_t hits = 0;
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* row = z + (t * N + n) * C;
          const int64_t label = y[t * N + n];
          acc += log_sum_exp<scalar_t>(row, C) - row[label];
          int64_t best = 0;
          for (int64_t c = 1; c < C && !std::isnan(row[best]); ++c)
            if (std::isnan(row[c]) || row[c] > row[best]) best = c;
          hits += best == label;
        }
        lo[t] = acc / scalar_t(N);
        ao[t] = static_cast<scalar_t>(hits) / static_cast<scalar_t>(N);
      }
    });
  });
  return {loss, accuracy};
}

// task_loss_and_grad: task_loss and task_loss_grad (unscaled) in one call, per task the
// loss's loop then the gradient's over the same (cache-resident) rows: both outputs equal
// the two kernels' bit for bit.
std::tuple<at::Tensor, at::Tensor> task_loss_and_grad(const at::Tensor& pred, const at::Tensor& target,
                                                      c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss_args(pred, target, kind);
  const int64_t T = pred.size(0), N = pred.size(1);
  const int64_t M = pred.numel() / T;
  at::Tensor loss = at::empty({T}, pred.options());
  at::Tensor grad = at::empty_like(pred);
  dispatch_floating(pred.scalar_type(), "task_loss_and_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* z = pred.data_ptr<scalar_t>();
    scalar_t* lo = loss.data_ptr<scalar_t>();
    scalar_t* o = grad.data_ptr<scalar_t>();
    at::parallel_for(0, T, per_task_grain(M), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (kind == LossKind::CrossEntropy) {
          const int64_t C = pred.size(2);
          const int64_t* y = target.data_ptr<int64_t>() + t * N;
          const scalar_t inv_n = scalar_t(1) / scalar_t(N);
          scalar_t acc = 0;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* row = z + (t * N + n) * C;
            acc += cross_entropy_row_grad<scalar_t>(row, C, y[n], inv_n, o + (t * N + n) * C) - row[y[n]];
          }
          lo[t] = acc / scalar_t(N);
        } else {
          const scalar_t* zt = z + t * M;
          const scalar_t* yt = target.data_ptr<scalar_t>() + t * M;
          lo[t] = mse_task_loss<scalar_t>(zt, yt, M);
          mse_task_grad<scalar_t>(zt, yt, M, o + t * M);
        }
      }
    });
  });
  return {loss, grad};
}

// ---------------------------------------------------------------------------------------
// The eager path's autograd nodes in C++ (see task_conv2d.cpp): task_loss and
// task_loss_grad, what fastmeta/ops/task_loss.py's Python nodes do, with the same kernel
// calls on the same arguments. The public ops take them where `_loss_native_node` and
// `_loss_grad_native_node` say.
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

// task_loss_grad_backward where its backward must record (third order): the public op,
// with torch.library's autograd (the reference's VJP).
at::Tensor public_loss_grad_backward(const at::Tensor& upstream, const at::Tensor& pred, const at::Tensor& target,
                                     const std::string& kind) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmeta::task_loss_grad_backward", "");
  return call_public_op(op, {upstream, pred, target, kind})[0].toTensor();
}

// The loss nodes' shared parts: what their forward saves (pred, target, the kind), and which
// gradients their backward gives (pred's; the target's for MSE, whose target is a float).
void save_loss_inputs(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                      const std::string& kind) {
  ctx->set_materialize_grads(false);
  ctx->save_for_backward({pred, target});
  ctx->saved_data["kind"] = kind;
}

struct LossBackward {
  std::string kind;
  bool wants_pred, wants_target;
  at::Tensor pred, target;

  // Whether there is anything to compute: an upstream gradient, and an input that wants one.
  LossBackward(AutogradContext* ctx, const at::Tensor& upstream) : kind(ctx->saved_data["kind"].toStringRef()) {
    wants_pred = ctx->needs_input_grad(0);
    wants_target = kind == "mse" && ctx->needs_input_grad(1);
    if (upstream.defined() && (wants_pred || wants_target)) {
      const auto saved = ctx->get_saved_variables();
      pred = saved[0];
      target = saved[1];
    }
  }

  bool any() const { return pred.defined(); }
};

struct TaskLossGradNode : public torch::autograd::Function<TaskLossGradNode> {
  // g = task_loss_grad(pred, target): inputs pred (edge 0) and target (edge 1; MSE's is
  // differentiable). `public_range`: record the public op's profiler range around the
  // kernel's (a call from task_loss's node; a call of the public op has opened it).
  // `with_loss`: the losses [T] first, from the same call (task_loss_and_grad), not
  // differentiable; then g.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                               std::string kind, bool public_range, bool with_loss) {
    save_loss_inputs(ctx, pred, target, kind);
    ctx->saved_data["with_loss"] = with_loss;
    if (with_loss) {
      at::Tensor loss, g;
      std::tie(loss, g) = recorded(nullptr, "fastmeta_ext::task_loss_and_grad", [&] {
        return task_loss_and_grad(pred.contiguous(), target.contiguous(), kind);
      });
      ctx->mark_non_differentiable({loss});
      return {loss, g};
    }
    at::Tensor g = recorded(public_range ? "fastmeta::task_loss_grad" : nullptr, "fastmeta_ext::task_loss_grad",
                            [&] { return task_loss_grad(pred.contiguous(), target.contiguous(), kind, {}); });
    return {g};
  }

  // d pred = task_loss_grad_backward(upstream, ...); MSE's target gets its negative.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    const at::Tensor& upstream = grads[ctx->saved_data["with_loss"].toBool() ? 1 : 0];
    const LossBackward b(ctx, upstream);
    if (!b.any()) return {none, none, none, none, none};
    at::Tensor d_pred;
    if (at::GradMode::is_enabled()) {
      d_pred = public_loss_grad_backward(upstream, b.pred, b.target, b.kind);
    } else {
      d_pred = recorded("fastmeta::task_loss_grad_backward", "fastmeta_ext::task_loss_grad_backward", [&] {
        return task_loss_grad_backward(upstream.contiguous(), b.pred.contiguous(), b.target.contiguous(), b.kind);
      });
    }
    return {b.wants_pred ? d_pred : none, b.wants_target ? d_pred.neg() : none, none, none, none};
  }
};

struct TaskLossNode : public torch::autograd::Function<TaskLossNode> {
  // loss = task_loss(pred, target) [T]; with `with_accuracy` (cross-entropy), the accuracy
  // [T] beside it from the same pass (task_loss_and_accuracy), not differentiable.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& pred, const at::Tensor& target,
                               std::string kind, bool with_accuracy) {
    save_loss_inputs(ctx, pred, target, kind);
    if (with_accuracy) {
      at::Tensor loss, accuracy;
      std::tie(loss, accuracy) = recorded(nullptr, "fastmeta_ext::task_loss_and_accuracy", [&] {
        return task_loss_and_accuracy(pred.contiguous(), target.contiguous());
      });
      ctx->mark_non_differentiable({accuracy});
      return {loss, accuracy};
    }
    at::Tensor loss = recorded(nullptr, "fastmeta_ext::task_loss",
                               [&] { return task_loss(pred.contiguous(), target.contiguous(), kind); });
    return {loss};
  }

  // d pred = task_loss_grad(pred, target) · grad_loss per task: grad_loss is the kernel's
  // scale (one pass, no multiply after it), or, where this backward records, task_loss_grad's
  // node times grad_loss; MSE's target gets its negative.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    const LossBackward b(ctx, grads[0]);
    if (!b.any()) return {none, none, none, none};
    at::Tensor g;
    const at::Tensor& grad_loss = grads[0];
    if (at::GradMode::is_enabled() &&
        (b.pred.requires_grad() || b.target.requires_grad() || grad_loss.requires_grad())) {
      std::vector<int64_t> per_task(b.pred.dim(), 1);
      per_task[0] = -1;
      g = at::mul(TaskLossGradNode::apply(b.pred, b.target, b.kind, true, false)[0], grad_loss.view(per_task));
    } else {
      const bool strided = grad_loss.size(0) <= 1 || grad_loss.stride(0) == 0 || grad_loss.stride(0) == 1;
      const at::Tensor scale = strided ? grad_loss : grad_loss.contiguous();
      g = recorded("fastmeta::task_loss_grad", "fastmeta_ext::task_loss_grad",
                   [&] { return task_loss_grad(b.pred.contiguous(), b.target.contiguous(), b.kind, scale); });
    }
    return {b.wants_pred ? g : none, b.wants_target ? g.neg() : none, none, none};
  }
};

std::vector<at::Tensor> task_loss_node(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind) {
  return TaskLossNode::apply(pred, target, std::string(kind.data(), kind.size()), false);
}

std::vector<at::Tensor> task_loss_and_accuracy_node(const at::Tensor& pred, const at::Tensor& target) {
  return TaskLossNode::apply(pred, target, std::string("cross_entropy"), true);
}

std::vector<at::Tensor> task_loss_grad_node(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind) {
  return TaskLossGradNode::apply(pred, target, std::string(kind.data(), kind.size()), false, false);
}

std::vector<at::Tensor> task_loss_and_grad_node(const at::Tensor& pred, const at::Tensor& target,
                                                c10::string_view kind) {
  return TaskLossGradNode::apply(pred, target, std::string(kind.data(), kind.size()), false, true);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("task_loss", &fastmeta::cpu::task_loss);
  m.impl("task_loss_grad", &fastmeta::cpu::task_loss_grad);
  m.impl("task_loss_grad_backward", &fastmeta::cpu::task_loss_grad_backward);
  m.impl("task_accuracy", &fastmeta::cpu::task_accuracy);
  m.impl("task_loss_and_accuracy", &fastmeta::cpu::task_loss_and_accuracy);
  m.impl("task_loss_and_grad", &fastmeta::cpu::task_loss_and_grad);
}

// The eager nodes' entries (see task_conv2d_node in task_conv2d.cpp).
TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("task_loss_node(Tensor pred, Tensor target, str kind) -> Tensor[]");
  m.def("task_loss_grad_node(Tensor pred, Tensor target, str kind) -> Tensor[]");
  m.def("task_loss_and_accuracy_node(Tensor pred, Tensor target) -> Tensor[]");
  m.def("task_loss_and_grad_node(Tensor pred, Tensor target, str kind) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("task_loss_node", &fastmeta::cpu::task_loss_node);
  m.impl("task_loss_grad_node", &fastmeta::cpu::task_loss_grad_node);
  m.impl("task_loss_and_accuracy_node", &fastmeta::cpu::task_loss_and_accuracy_node);
  m.impl("task_loss_and_grad_node", &fastmeta::cpu::task_loss_and_grad_node);
}
