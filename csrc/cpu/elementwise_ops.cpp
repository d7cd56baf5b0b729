// CPU kernels of the element-wise families: inner_step (+ backward), activation_grad,
// task_loss (+ grad). All are memory-bound: one pass over [T, P] or [T, N, K], vectorised
// along the contiguous last dim, parallel over tasks (or blocks of the flat buffer).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"

namespace fastmeta {
namespace cpu {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;
// Elements per parallel chunk: below ~32k floats the OpenMP fork/join (a few µs) costs
// more than the pass itself on this class of machine.
constexpr int64_t kGrain = 32768;

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
      TORCH_CHECK(t.dim() == 1 && t.size(0) == P, "mask/precond must be [P] = [", P, "], got ", t.sizes());
    }
  }
  if (segments.has_value()) {
    FM_CHECK_INPUT(*segments, kCPU);
    TORCH_CHECK(segments->scalar_type() == at::kLong, "segments must be int64");
    TORCH_CHECK(segments->dim() == 1 && segments->size(0) == P, "segments must be [P]");
    TORCH_CHECK(lr.dim() == 1, "per-segment lr must be [S], got ", lr.sizes());
    const int64_t S = lr.size(0);
    const int64_t* seg = segments->data_ptr<int64_t>();
    for (int64_t p = 0; p < P; ++p)  // an index out of range would read past lr
      TORCH_CHECK(seg[p] >= 0 && seg[p] < S, "segments[", p, "] = ", seg[p], " is not in [0, ", S, ")");
  } else {
    TORCH_CHECK(lr.dim() == 0 || (lr.dim() == 1 && lr.size(0) == P),
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
  TORCH_CHECK(shared ? theta.size(0) == P : (theta.dim() == 2 && theta.sizes() == grad.sizes()),
              "theta must be [P] or [T, P] like grad ", grad.sizes(), ", got ", theta.sizes());
  at::Tensor out = at::empty_like(grad);
  dispatch_floating(grad.scalar_type(), "inner_step", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    std::vector<scalar_t> rate(P), coef(P);
    step_coefficients<scalar_t>(lr, mask, precond, segments, P, rate.data(), coef.data());
    const scalar_t* th = theta.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* c = coef.data();
    at::parallel_for(0, T, std::max<int64_t>(1, kGrain / std::max<int64_t>(P, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* tht = shared ? th : th + t * P;
        const scalar_t* gt = g + t * P;
        scalar_t* ot = o + t * P;
#pragma omp simd
        for (int64_t p = 0; p < P; ++p) ot[p] = tht[p] - c[p] * gt[p];
      }
    });
  });
  return out;
}

bool need(const c10::List<bool>& needs, size_t i) { return needs.size() > i && needs.get(i); }

std::vector<at::Tensor> inner_step_backward(const at::Tensor& grad_out, const at::Tensor& grad,
                                            const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& precond,
                                            const c10::optional<at::Tensor>& segments, bool theta_shared,
                                            const c10::List<bool>& needs) {
  check_step_args(grad, lr, mask, precond, segments);
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_SAME_DTYPE(grad_out, grad);
  TORCH_CHECK(grad_out.sizes() == grad.sizes(), "grad_out must be ", grad.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(needs.size() == 5, "needs must hold 5 flags, got ", needs.size());
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
    std::vector<scalar_t> rate(P), coef(P);
    step_coefficients<scalar_t>(lr, mask, precond, segments, P, rate.data(), coef.data());
    const scalar_t* go = grad_out.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* c = coef.data();
    if (need_grad) {
      scalar_t* dg = d_grad.data_ptr<scalar_t>();
      at::parallel_for(0, T, std::max<int64_t>(1, kGrain / std::max<int64_t>(P, 1)), [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
#pragma omp simd
          for (int64_t p = 0; p < P; ++p) dg[t * P + p] = -c[p] * go[t * P + p];
        }
      });
    }
    if (need_theta && !theta_shared) {
      std::copy(go, go + T * P, d_theta.data_ptr<scalar_t>());
    }
    const bool need_outer = need_lr || need_mask || need_precond;
    if (!(need_theta && theta_shared) && !need_outer) return;
    // Reductions over tasks, parallel over blocks of parameters so that each thread owns
    // its outputs (no atomics, deterministic): Σ_t grad_out and −Σ_t grad_out·g.
    std::vector<scalar_t> outer(need_outer ? P : 0);
    scalar_t* dth = (need_theta && theta_shared) ? d_theta.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_p = outer.data();
    at::parallel_for(0, P, std::max<int64_t>(1, kGrain / std::max<int64_t>(T, 1)), [&](int64_t p0, int64_t p1) {
      if (dth) {
        for (int64_t p = p0; p < p1; ++p) dth[p] = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* gt = go + t * P;
#pragma omp simd
          for (int64_t p = p0; p < p1; ++p) dth[p] += gt[p];
        }
      }
      if (need_outer) {
        for (int64_t p = p0; p < p1; ++p) out_p[p] = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t* got = go + t * P;
          const scalar_t* gt = g + t * P;
#pragma omp simd
          for (int64_t p = p0; p < p1; ++p) out_p[p] -= got[p] * gt[p];
        }
      }
    });
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
      for (int64_t p = 0; p < P; ++p) dm[p] = out_p[p] * rate[p] * (pc ? pc[p] : scalar_t(1));
    }
    if (need_precond) {
      scalar_t* dp = d_precond.data_ptr<scalar_t>();
      for (int64_t p = 0; p < P; ++p) dp[p] = out_p[p] * rate[p] * (m ? m[p] : scalar_t(1));
    }
  });
  return {d_theta, d_grad, d_lr, d_mask, d_precond};
}

at::Tensor activation_grad(const at::Tensor& grad_y, const at::Tensor& y, c10::string_view act_name,
                           double negative_slope) {
  FM_CHECK_INPUT(grad_y, kCPU);
  FM_CHECK_INPUT(y, kCPU);
  FM_CHECK_FLOATING(y);
  FM_CHECK_SAME_DTYPE(grad_y, y);
  TORCH_CHECK(grad_y.sizes() == y.sizes(), "grad_y must be ", y.sizes(), ", got ", grad_y.sizes());
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  at::Tensor out = at::empty_like(y);
  const int64_t n = y.numel();
  dispatch_floating(y.scalar_type(), "activation_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* gy = grad_y.data_ptr<scalar_t>();
    const scalar_t* yy = y.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t s = static_cast<scalar_t>(negative_slope);
    at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
      switch (act) {  // one loop per activation, so that each vectorises
        case Act::Relu:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = yy[i] > 0 ? gy[i] : scalar_t(0);
          break;
        case Act::LeakyRelu:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = yy[i] > 0 ? gy[i] : gy[i] * s;
          break;
        case Act::Tanh:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = gy[i] * (scalar_t(1) - yy[i] * yy[i]);
          break;
        case Act::Sigmoid:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = gy[i] * yy[i] * (scalar_t(1) - yy[i]);
          break;
        default:
#pragma omp simd
          for (int64_t i = i0; i < i1; ++i) o[i] = gy[i];
      }
    });
  });
  return out;
}

// Shapes of task_loss: pred [T, N, K]; cross-entropy target int64 [T, N]; MSE target the
// shape of pred (any trailing dims, flattened to [T, M] here).
void check_loss_args(const at::Tensor& pred, const at::Tensor& target, LossKind kind) {
  FM_CHECK_INPUT(pred, kCPU);
  FM_CHECK_INPUT(target, kCPU);
  FM_CHECK_FLOATING(pred);
  TORCH_CHECK(pred.dim() >= 2 && pred.size(0) > 0, "pred must be [T, N, ...], got ", pred.sizes());
  if (kind == LossKind::CrossEntropy) {
    FM_CHECK_DIM(pred, 3);
    TORCH_CHECK(target.scalar_type() == at::kLong, "cross-entropy target must be int64");
    TORCH_CHECK(target.dim() == 2 && target.size(0) == pred.size(0) && target.size(1) == pred.size(1),
                "cross-entropy target must be [T, N] = [", pred.size(0), ", ", pred.size(1), "], got ",
                target.sizes());
    const int64_t C = pred.size(2);
    const int64_t* y = target.data_ptr<int64_t>();
    for (int64_t i = 0; i < target.numel(); ++i)  // a label out of range would read past the row
      TORCH_CHECK(y[i] >= 0 && y[i] < C, "target label ", y[i], " is not in [0, ", C, ")");
  } else {
    FM_CHECK_SAME_DTYPE(pred, target);
    TORCH_CHECK(target.sizes() == pred.sizes(), "MSE target must be ", pred.sizes(), ", got ", target.sizes());
  }
}

// Row-wise log-sum-exp softmax, the max subtracted first so exp never overflows.
template <typename T>
inline T softmax_row(const T* z, int64_t C, T* p) {
  T mx = z[0];
  for (int64_t c = 1; c < C; ++c) mx = std::max(mx, z[c]);
  T sum = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T e = std::exp(z[c] - mx);
    if (p) p[c] = e;
    sum += e;
  }
  return mx + std::log(sum);  // log Σ exp z
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
    at::parallel_for(0, T, std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t acc = 0;
        if (kind == LossKind::CrossEntropy) {
          const int64_t C = pred.size(2);
          const int64_t* y = target.data_ptr<int64_t>() + t * N;
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* row = z + (t * N + n) * C;
            acc += softmax_row<scalar_t>(row, C, nullptr) - row[y[n]];
          }
          o[t] = acc / scalar_t(N);
        } else {
          const scalar_t* zt = z + t * M;
          const scalar_t* yt = target.data_ptr<scalar_t>() + t * M;
#pragma omp simd reduction(+ : acc)
          for (int64_t i = 0; i < M; ++i) acc += (zt[i] - yt[i]) * (zt[i] - yt[i]);
          o[t] = acc / scalar_t(M);
        }
      }
    });
  });
  return out;
}

at::Tensor task_loss_grad(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss_args(pred, target, kind);
  const int64_t T = pred.size(0), N = pred.size(1);
  const int64_t M = pred.numel() / T;
  at::Tensor out = at::empty_like(pred);
  dispatch_floating(pred.scalar_type(), "task_loss_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* z = pred.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, std::max<int64_t>(1, kGrain / std::max<int64_t>(M, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        if (kind == LossKind::CrossEntropy) {
          const int64_t C = pred.size(2);
          const int64_t* y = target.data_ptr<int64_t>() + t * N;
          const scalar_t inv_n = scalar_t(1) / scalar_t(N);
          for (int64_t n = 0; n < N; ++n) {
            const scalar_t* row = z + (t * N + n) * C;
            scalar_t* orow = o + (t * N + n) * C;
            const scalar_t lse = softmax_row<scalar_t>(row, C, nullptr);
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) orow[c] = std::exp(row[c] - lse) * inv_n;
            orow[y[n]] -= inv_n;
          }
        } else {
          const scalar_t* zt = z + t * M;
          const scalar_t* yt = target.data_ptr<scalar_t>() + t * M;
          scalar_t* ot = o + t * M;
          const scalar_t scale = scalar_t(2) / scalar_t(M);
#pragma omp simd
          for (int64_t i = 0; i < M; ++i) ot[i] = (zt[i] - yt[i]) * scale;
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("inner_step", &fastmeta::cpu::inner_step);
  m.impl("inner_step_backward", &fastmeta::cpu::inner_step_backward);
  m.impl("activation_grad", &fastmeta::cpu::activation_grad);
  m.impl("task_loss", &fastmeta::cpu::task_loss);
  m.impl("task_loss_grad", &fastmeta::cpu::task_loss_grad);
}
