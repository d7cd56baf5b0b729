// CPU kernels of inner_step and its backward: one memory-bound pass over the [T, P] buffer,
// vectorised along P, parallel over blocks of it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "../common.h"
#include "cpu_common.h"
#include "eager_nodes.h"

namespace fastmeta {
namespace cpu {
namespace {

// The step coefficient lr·mask·precond per parameter, and the rate alone: [P] each.
template <typename T>
void step_coefficients(const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                       const c10::optional<at::Tensor>& precond,
                       const c10::optional<at::Tensor>& segments, int64_t P, T* rate, T* coef) {
  const T* lr_p = lr.data_ptr<T>();
  const int64_t* seg = segments.has_value() ? segments->data_ptr<int64_t>() : nullptr;
  const T* m = mask.has_value() ? mask->data_ptr<T>() : nullptr;
  const T* pc = precond.has_value() ? precond->data_ptr<T>() : nullptr;
  const bool scalar = lr.dim() == 0;
  for (int64_t p = 0; p < P; ++p) {
    T r = scalar ? lr_p[0] : (seg ? lr_p[seg[p]] : lr_p[p]);
    rate[p] = r;
    if (m) r *= m[p];
    if (pc) r *= pc[p];
    coef[p] = r;
  }
}

// The step's coefficients: one value for every parameter where the rate is a scalar and
// there is no mask or preconditioner (MAML's), else the [P] vectors of step_coefficients.
template <typename T>
struct StepCoefficients {
  bool uniform;
  T uniform_coef = T(0);
  std::vector<T> rate, coef;

  StepCoefficients(const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                   const c10::optional<at::Tensor>& precond, const c10::optional<at::Tensor>& segments, int64_t P)
      : uniform(lr.dim() == 0 && !mask.has_value() && !precond.has_value()) {
    if (uniform) {
      uniform_coef = lr.data_ptr<T>()[0];
    } else {
      rate.resize(P);
      coef.resize(P);
      step_coefficients<T>(lr, mask, precond, segments, P, rate.data(), coef.data());
    }
  }

  T rate_at(int64_t p) const { return uniform ? uniform_coef : rate[p]; }
};

// Parameters per block of the passes over a [T, P] buffer (every task's row per block):
// FASTMETA_STEP_COLUMNS, read once per process, a whole number from 64 (default 16 384); any
// other value is refused, naming the variable.
int64_t step_columns() {
  static const int64_t columns = [] {
    const char* env = std::getenv("FASTMETA_STEP_COLUMNS");
    if (env == nullptr || *env == '\0') return int64_t(16384);
    char* end = nullptr;
    const long long value = std::strtoll(env, &end, 10);
    TORCH_CHECK_VALUE(end != env && *end == '\0' && value >= 64 && value <= (int64_t(1) << 30),
                      "FASTMETA_STEP_COLUMNS must be a whole number from 64 to 2^30, got '", env, "'");
    return int64_t(value);
  }();
  return columns;
}

void check_step_args(const at::Tensor& grad, const at::Tensor& lr,
                     const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& precond,
                     const c10::optional<at::Tensor>& segments) {
  FM_CHECK_INPUT(grad, kCPU);
  FM_CHECK_FLOATING(grad);
  FM_CHECK_DIM(grad, 2);
  FM_CHECK_INPUT(lr, kCPU);
  FM_CHECK_SAME_DTYPE(lr, grad);
  const int64_t P = grad.size(1);
  for (const auto* opt : {&mask, &precond}) {
    if (opt->has_value()) {
      const at::Tensor& t = **opt;
      FM_CHECK_INPUT(t, kCPU);
      FM_CHECK_SAME_DTYPE(t, grad);
      TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == P, "mask/precond must be [P] = [", P, "], got ", t.sizes());
    }
  }
  if (segments.has_value()) {
    FM_CHECK_INPUT(*segments, kCPU);
    TORCH_CHECK_TYPE(segments->scalar_type() == at::kLong, "segments must be int64, got ", segments->scalar_type());
    TORCH_CHECK_VALUE(segments->dim() == 1 && segments->size(0) == P, "segments must be [P]");
    TORCH_CHECK_VALUE(lr.dim() == 1, "per-segment lr must be [S], got ", lr.sizes());
    const int64_t S = lr.size(0);
    const int64_t* seg = segments->data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p)  // an index out of range would read past lr
      TORCH_CHECK_INDEX(seg[p] >= 0 && seg[p] < S, "segments[", p, "] = ", seg[p], " is not in [0, ", S, ")");
  } else {
    TORCH_CHECK_VALUE(lr.dim() == 0 || (lr.dim() == 1 && lr.size(0) == P),
                "lr must be a scalar or [P] = [", P, "] without segments, got ", lr.sizes());
  }
}

at::Tensor inner_step(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                      const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& precond,
                      const c10::optional<at::Tensor>& segments) {
  check_step_args(grad, lr, mask, precond, segments);
  FM_CHECK_INPUT(theta, kCPU);
  FM_CHECK_SAME_DTYPE(theta, grad);
  const int64_t T = grad.size(0), P = grad.size(1);
  const bool shared = theta.dim() == 1;
  TORCH_CHECK_VALUE(shared ? theta.size(0) == P : (theta.dim() == 2 && theta.sizes() == grad.sizes()),
              "theta must be [P] or [T, P] like grad ", grad.sizes(), ", got ", theta.sizes());
  at::Tensor out = at::empty_like(grad);
  dispatch_floating(grad.scalar_type(), "inner_step", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const StepCoefficients<scalar_t> coefficients(lr, mask, precond, segments, P);
    const scalar_t* th = theta.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* c = coefficients.coef.data();
    const scalar_t c0 = coefficients.uniform_coef;
    const bool uniform = coefficients.uniform;
    // Blocks of parameters, every task's row per block: a shared θ's block and the
    // coefficients' stay in cache while the tasks pass, so the pass streams grad and out
    // once, not θ and the coefficients once per task as well.
    const int64_t columns = step_columns();
    at::parallel_for(0, P, columns, [&, th, g, o, c, c0](int64_t p0, int64_t p1) {
      // The pointers as locals (see inner_step_backward).
      const scalar_t* const th_ = th;
      const scalar_t* const g_ = g;
      scalar_t* const o_ = o;
      const scalar_t* const c_ = c;
      const scalar_t c0_ = c0;
      for (int64_t b0 = p0; b0 < p1; b0 += columns) {
        const int64_t b1 = std::min(p1, b0 + columns);
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* tht = shared ? th_ : th_ + t * P;
          const scalar_t* gt = g_ + t * P;
          scalar_t* ot = o_ + t * P;
          if (uniform) {
#pragma omp simd
            for (int64_t p = b0; p < b1; ++p) ot[p] = tht[p] - c0_ * gt[p];
          } else {
#pragma omp simd
            for (int64_t p = b0; p < b1; ++p) ot[p] = tht[p] - c_[p] * gt[p];
          }
        }
      }
    });
  });
  return out;
}

// One task's row of inner_step_backward over the parameters [b0, b1): d grad = −c·grad_out,
// and the reductions over tasks Σ_t grad_out (d θ, shared) and −Σ_t grad_out·g (the rates'
// outer term), each where its pointer is given, in one loop: grad_out's block is read once.
template <typename T>
struct BackwardRow {
  const T* go;
  const T* g;
  const T* c;
  T c0;
  T* dg;
  T* dth;
  T* outer;

  template <bool kDg, bool kDth, bool kOuter, bool kUniform>
  void block(int64_t row, int64_t b0, int64_t b1) const {
    const T* const got = go + row;
    const T* const gt = g + row;
    T* const dgt = kDg ? dg + row : nullptr;
    const T* const c_ = c;
    const T c0_ = c0;
    T* const dth_ = dth;
    T* const out_ = outer;
#pragma omp simd
    for (int64_t p = b0; p < b1; ++p) {
      const T v = got[p];
      if constexpr (kDg) dgt[p] = kUniform ? -c0_ * v : -c_[p] * v;
      if constexpr (kDth) dth_[p] += v;
      if constexpr (kOuter) out_[p] -= v * gt[p];
    }
  }

  void run(int64_t row, int64_t b0, int64_t b1, bool uniform) const {
    const int which = (dg ? 1 : 0) | (dth ? 2 : 0) | (outer ? 4 : 0);
    switch (which | (uniform && dg ? 8 : 0)) {
      case 1: return block<true, false, false, false>(row, b0, b1);
      case 2: return block<false, true, false, false>(row, b0, b1);
      case 3: return block<true, true, false, false>(row, b0, b1);
      case 4: return block<false, false, true, false>(row, b0, b1);
      case 5: return block<true, false, true, false>(row, b0, b1);
      case 6: return block<false, true, true, false>(row, b0, b1);
      case 7: return block<true, true, true, false>(row, b0, b1);
      case 9: return block<true, false, false, true>(row, b0, b1);
      case 11: return block<true, true, false, true>(row, b0, b1);
      case 13: return block<true, false, true, true>(row, b0, b1);
      case 15: return block<true, true, true, true>(row, b0, b1);
      default: return;
    }
  }
};

bool need(const c10::List<bool>& needs, size_t i) { return needs.size() > i && needs.get(i); }

std::vector<at::Tensor> inner_step_backward(const at::Tensor& grad_out, const at::Tensor& grad,
                                            const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& precond,
                                            const c10::optional<at::Tensor>& segments, bool theta_shared,
                                            const c10::List<bool>& needs) {
  check_step_args(grad, lr, mask, precond, segments);
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_SAME_DTYPE(grad_out, grad);
  TORCH_CHECK_VALUE(grad_out.sizes() == grad.sizes(), "grad_out must be ", grad.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(needs.size() == 5, "needs must hold 5 flags, got ", needs.size());
  const int64_t T = grad.size(0), P = grad.size(1);
  const bool need_theta = need(needs, 0), need_grad = need(needs, 1), need_lr = need(needs, 2);
  const bool need_mask = need(needs, 3) && mask.has_value();
  const bool need_precond = need(needs, 4) && precond.has_value();
  auto empty = [&] { return at::empty({0}, grad.options()); };
  at::Tensor d_theta = need_theta ? (theta_shared ? at::empty({P}, grad.options()) : at::empty_like(grad)) : empty();
  at::Tensor d_grad = need_grad ? at::empty_like(grad) : empty();
  at::Tensor d_lr = need_lr ? at::zeros(lr.sizes(), lr.options()) : empty();
  at::Tensor d_mask = need_mask ? at::empty({P}, grad.options()) : empty();
  at::Tensor d_precond = need_precond ? at::empty({P}, grad.options()) : empty();
  dispatch_floating(grad.scalar_type(), "inner_step_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const StepCoefficients<scalar_t> coefficients(lr, mask, precond, segments, P);
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* c = coefficients.coef.data();
    const scalar_t c0 = coefficients.uniform_coef;
    const bool uniform = coefficients.uniform;
    scalar_t* dg = need_grad ? d_grad.data_ptr<scalar_t>() : nullptr;
    if (need_theta && !theta_shared) {
      std::copy(go, go + T * P, d_theta.data_ptr<scalar_t>());
    }
    // One pass over grad_out (a [T, P] buffer: 31 MB at OmniglotFC's 32 tasks, so the pass
    // is what costs): per block of parameters, every task's row writes d grad = −c·grad_out
    // and adds into the reductions over tasks Σ_t grad_out (d θ, shared) and −Σ_t
    // grad_out·g (the rates' outer term). Each thread owns its block's outputs: no atomics,
    // deterministic, the sums in task order as before.
    const bool need_outer = need_lr || need_mask || need_precond;
    std::vector<scalar_t> outer(need_outer ? P : 0);
    scalar_t* dth = (need_theta && theta_shared) ? d_theta.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = outer.data();
    if (dg || dth || need_outer) {
      const int64_t columns = step_columns();
      at::parallel_for(0, P, columns, [&, go, g, c, c0, dg, dth, out_p](int64_t p0, int64_t p1) {
        // The pointers as locals: read through the lambda's references, gcc reloads them
        // per element and may leave the loops scalar (csrc/cpu/task_batch_norm.cpp).
        const scalar_t* const go_ = go;
        const scalar_t* const g_ = g;
        const scalar_t* const c_ = c;
        scalar_t* const dg_ = dg;
        scalar_t* const dth_ = dth;
        scalar_t* const out_ = out_p;
        if (dth_) std::fill(dth_ + p0, dth_ + p1, scalar_t(0));
        if (need_outer) std::fill(out_ + p0, out_ + p1, scalar_t(0));
        // Blocks of parameters (step_columns), so that the sums being accumulated stay in
        // cache while every task's row passes (one thread gets all of [0, P) in one call);
        // each row's block in one loop for the outputs asked (backward_block).
        const BackwardRow<scalar_t> row{go_, g_, c_, c0, dg_, dth_, need_outer ? out_ : nullptr};
        for (int64_t b0 = p0; b0 < p1; b0 += columns) {
          const int64_t b1 = std::min(p1, b0 + columns);
          for (int64_t t = 0; t < T; ++t) row.run(t * P, b0, b1, uniform);
        }
      });
    }
    if (!need_outer) return;
    const scalar_t* m = mask.has_value() ? mask->data_ptr<scalar_t>() : nullptr;
    const scalar_t* pc = precond.has_value() ? precond->data_ptr<scalar_t>() : nullptr;
    if (need_lr) {
      scalar_t* dl = d_lr.data_ptr<scalar_t>();
      const int64_t* seg = segments.has_value() ? segments->data_ptr<int64_t>() : nullptr;
      const bool scalar = lr.dim() == 0;
      for (int64_t p = 0; p < P; ++p) {
        scalar_t d = out_p[p];
        if (m) d *= m[p];
        if (pc) d *= pc[p];
        if (scalar) dl[0] += d;
        else if (seg) dl[seg[p]] += d;
        else dl[p] = d;
      }
    }
    if (need_mask) {
      scalar_t* dm = d_mask.data_ptr<scalar_t>();
      for (int64_t p = 0; p < P; ++p) dm[p] = out_p[p] * coefficients.rate_at(p) * (pc ? pc[p] : scalar_t(1));
    }
    if (need_precond) {
      scalar_t* dp = d_precond.data_ptr<scalar_t>();
      for (int64_t p = 0; p < P; ++p) dp[p] = out_p[p] * coefficients.rate_at(p) * (m ? m[p] : scalar_t(1));
    }
  });
  return {d_theta, d_grad, d_lr, d_mask, d_precond};
}

// ---------------------------------------------------------------------------------------
// The eager path's autograd node in C++ (see task_conv2d.cpp): inner_step, what
// fastmeta/ops/inner_step.py's Python node does, with the same kernel calls on the same
// arguments. The public op takes it where `_inner_step_native_node` says.
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

// A shared tensor as the launchers give it (fastmeta/backends/table.py's
// shared_or_contiguous): a task stride of 0 → the shared row; anything else contiguous.
c10::optional<at::Tensor> shared_or_contiguous(const c10::optional<at::Tensor>& t, bool task_dim) {
  if (!t.has_value()) return c10::nullopt;
  at::Tensor u = *t;
  if (task_dim && u.dim() >= 2 && u.size(0) > 1 && u.stride(0) == 0) u = u.select(0, 0);
  return u.contiguous();
}

struct InnerStepNode : public torch::autograd::Function<InnerStepNode> {
  // θ' = inner_step(theta, grad, lr, mask, precond, segments): inputs theta, grad, lr, then
  // mask and precond where given (segments: indices, no gradient).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& theta, const at::Tensor& grad,
                               const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                               const c10::optional<at::Tensor>& precond, const c10::optional<at::Tensor>& segments) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad, lr, mask.value_or(at::Tensor()), precond.value_or(at::Tensor()),
                            segments.value_or(at::Tensor())});
    ctx->saved_data["theta_shared"] = theta.dim() == 1;
    ctx->saved_data["edges"] =
        edge_indices({true, true, true, mask.has_value(), precond.has_value(), segments.has_value()});
    at::Tensor out = recorded(nullptr, "fastmeta_ext::inner_step", [&] {
      return inner_step(*shared_or_contiguous(theta, true), grad.contiguous(), lr.contiguous(),
                        shared_or_contiguous(mask, false), shared_or_contiguous(precond, false),
                        shared_or_contiguous(segments, false));
    });
    return {out};
  }

  // The five input gradients in one inner_step_backward call; where this backward records
  // (third order), the public op with torch.library's autograd (the reference's VJP).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad = saved[0], &lr = saved[1], &mask = saved[2], &precond = saved[3],
                     &segments = saved[4];
    const auto edges = ctx->saved_data["edges"].toIntVector();
    const bool theta_shared = ctx->saved_data["theta_shared"].toBool();
    const bool needs[5] = {needs_grad(ctx, edges[0]), needs_grad(ctx, edges[1]), needs_grad(ctx, edges[2]),
                           mask.defined() && needs_grad(ctx, edges[3]),
                           precond.defined() && needs_grad(ctx, edges[4])};
    if (!grads[0].defined() || !(needs[0] || needs[1] || needs[2] || needs[3] || needs[4]))
      return {none, none, none, none, none, none};
    const c10::List<bool> need_list = bool_list({needs[0], needs[1], needs[2], needs[3], needs[4]});
    std::vector<at::Tensor> outs;
    if (at::GradMode::is_enabled()) {
      static const c10::OperatorHandle op =
          c10::Dispatcher::singleton().findSchemaOrThrow("fastmeta::inner_step_backward", "");
      outs = call_public_op(op, {grads[0].contiguous(), grad, lr, maybe(mask), maybe(precond), maybe(segments),
                                 theta_shared, need_list})[0]
                 .toTensorVector();
    } else {
      outs = recorded("fastmeta::inner_step_backward", "fastmeta_ext::inner_step_backward", [&] {
        return inner_step_backward(grads[0].contiguous(), grad.contiguous(), lr.contiguous(),
                                   shared_or_contiguous(maybe(mask), false), shared_or_contiguous(maybe(precond), false),
                                   shared_or_contiguous(maybe(segments), false), theta_shared, need_list);
      });
    }
    return {needs[0] ? outs[0] : none, needs[1] ? outs[1] : none, needs[2] ? outs[2] : none,
            needs[3] ? outs[3] : none, needs[4] ? outs[4] : none, none};
  }
};

std::vector<at::Tensor> inner_step_node(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                                        const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& precond,
                                        const c10::optional<at::Tensor>& segments) {
  return InnerStepNode::apply(theta, grad, lr, mask, precond, segments);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("inner_step", &fastmeta::cpu::inner_step);
  m.impl("inner_step_backward", &fastmeta::cpu::inner_step_backward);
}

// The eager node's entry (see task_conv2d_node in task_conv2d.cpp).
TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("inner_step_node(Tensor theta, Tensor grad, Tensor lr, Tensor? mask, Tensor? precond, Tensor? segments) "
        "-> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("inner_step_node", &fastmeta::cpu::inner_step_node);
}
