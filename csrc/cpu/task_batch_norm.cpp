// CPU kernels of task_batch_norm: per-task, per-channel batch statistics (MAML's
// transductive BatchNorm), affine and activation fused, and its backward.
// Grid: one work item per (task, channel); each makes two passes over its N·S values for
// the statistics (two-pass variance: the one-pass E[x²]−E[x]² loses ~7 digits in fp32
// when |mean| ≫ std) and one to write. Memory-bound.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common.h"
#include "cpu_common.h"

namespace fastmeta {
namespace cpu {
namespace {



struct BnShape {
  int64_t T, N, C, S;  // x viewed as [T, N, C, S], S = product of the spatial dims
};

BnShape check_bn(const at::Tensor& x, const c10::optional<at::Tensor>& gamma, const char* gamma_name) {
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  TORCH_CHECK(x.dim() >= 3, "x must be [T, N, C, *spatial], got ", x.sizes());
  BnShape s{x.size(0), x.size(1), x.size(2), 1};
  for (int64_t d = 3; d < x.dim(); ++d) s.S *= x.size(d);
  if (gamma.has_value()) {
    FM_CHECK_INPUT(*gamma, kCPU);
    FM_CHECK_SAME_DTYPE(*gamma, x);
    TORCH_CHECK((gamma->dim() == 1 && gamma->size(0) == s.C) ||
                    (gamma->dim() == 2 && gamma->size(0) == s.T && gamma->size(1) == s.C),
                gamma_name, " must be [C] or [T, C] with C = ", s.C, ", got ", gamma->sizes());
  }
  return s;
}

template <typename T>
inline T channel_param(const c10::optional<at::Tensor>& p, int64_t t, int64_t c, int64_t C, T fallback) {
  if (!p.has_value()) return fallback;
  const T* d = p->data_ptr<T>();
  return p->dim() == 1 ? d[c] : d[t * C + c];
}

// Mean and 1/√(var + eps) of the (t, c) slice.
template <typename T>
inline void slice_stats(const T* x, const BnShape& s, int64_t t, int64_t c, double eps, T& mean, T& rstd) {
  const int64_t count = s.N * s.S;
  T sum = 0;
  for (int64_t n = 0; n < s.N; ++n) {
    const T* row = x + ((t * s.N + n) * s.C + c) * s.S;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < s.S; ++i) sum += row[i];
  }
  mean = sum / T(count);
  T sq = 0;
  for (int64_t n = 0; n < s.N; ++n) {
    const T* row = x + ((t * s.N + n) * s.C + c) * s.S;
#pragma omp simd reduction(+ : sq)
    for (int64_t i = 0; i < s.S; ++i) sq += (row[i] - mean) * (row[i] - mean);
  }
  rstd = T(1) / std::sqrt(sq / T(count) + T(eps));
}

int64_t grain_for(const BnShape& s) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(s.N * s.S, 1)); }

at::Tensor task_batch_norm(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                           const c10::optional<at::Tensor>& beta, double eps, c10::string_view act_name,
                           double negative_slope) {
  const BnShape s = check_bn(x, gamma, "gamma");
  check_bn(x, beta, "beta");
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  dispatch_floating(x.scalar_type(), "task_batch_norm", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using T_ = scalar_t;
    const T_* xp = x.data_ptr<T_>();
    T_* yp = y.data_ptr<T_>();
    const T_ slope = static_cast<T_>(negative_slope);
    at::parallel_for(0, s.T * s.C, grain_for(s), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / s.C, c = j % s.C;
        T_ mean, rstd;
        slice_stats<T_>(xp, s, t, c, eps, mean, rstd);
        const T_ scale = rstd * channel_param<T_>(gamma, t, c, s.C, T_(1));
        const T_ shift = channel_param<T_>(beta, t, c, s.C, T_(0)) - mean * scale;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t off = ((t * s.N + n) * s.C + c) * s.S;
#pragma omp simd
          for (int64_t i = 0; i < s.S; ++i) yp[off + i] = xp[off + i] * scale + shift;
          if (act != Act::None)
            for (int64_t i = 0; i < s.S; ++i) yp[off + i] = act_forward<T_>(yp[off + i], act, slope);
        }
      }
    });
  });
  return y;
}

std::vector<at::Tensor> task_batch_norm_backward(const at::Tensor& grad_z, const at::Tensor& x,
                                                 const c10::optional<at::Tensor>& gamma, double eps,
                                                 const c10::List<bool>& needs) {
  const BnShape s = check_bn(x, gamma, "gamma");
  FM_CHECK_INPUT(grad_z, kCPU);
  FM_CHECK_SAME_DTYPE(grad_z, x);
  TORCH_CHECK(grad_z.sizes() == x.sizes(), "grad_z must be ", x.sizes(), ", got ", grad_z.sizes());
  TORCH_CHECK(needs.size() == 3, "needs must hold 3 flags, got ", needs.size());
  const bool need_x = needs.get(0), need_gamma = needs.get(1), need_beta = needs.get(2);
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need_x ? at::empty_like(x) : empty();
  at::Tensor gg = need_gamma ? at::empty({s.T, s.C}, x.options()) : empty();
  at::Tensor gb = need_beta ? at::empty({s.T, s.C}, x.options()) : empty();
  if (x.numel() == 0) {
    if (need_gamma) gg.zero_();
    if (need_beta) gb.zero_();
    return {gx, gg, gb};
  }
  dispatch_floating(x.scalar_type(), "task_batch_norm_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using T_ = scalar_t;
    const T_* xp = x.data_ptr<T_>();
    const T_* gz = grad_z.data_ptr<T_>();
    T_* gxp = need_x ? gx.data_ptr<T_>() : nullptr;
    T_* ggp = need_gamma ? gg.data_ptr<T_>() : nullptr;
    T_* gbp = need_beta ? gb.data_ptr<T_>() : nullptr;
    const T_ count = T_(s.N * s.S);
    at::parallel_for(0, s.T * s.C, grain_for(s), [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / s.C, c = j % s.C;
        T_ mean, rstd;
        slice_stats<T_>(xp, s, t, c, eps, mean, rstd);
        T_ sum_g = 0, sum_gx = 0;  // Σ grad_z and Σ grad_z · x̂
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t off = ((t * s.N + n) * s.C + c) * s.S;
#pragma omp simd reduction(+ : sum_g, sum_gx)
          for (int64_t i = 0; i < s.S; ++i) {
            sum_g += gz[off + i];
            sum_gx += gz[off + i] * (xp[off + i] - mean) * rstd;
          }
        }
        if (ggp) ggp[j] = sum_gx;
        if (gbp) gbp[j] = sum_g;
        if (gxp) {
          const T_ scale = rstd * channel_param<T_>(gamma, t, c, s.C, T_(1));
          const T_ mg = sum_g / count, mgx = sum_gx / count;
          for (int64_t n = 0; n < s.N; ++n) {
            const int64_t off = ((t * s.N + n) * s.C + c) * s.S;
#pragma omp simd
            for (int64_t i = 0; i < s.S; ++i)
              gxp[off + i] = scale * (gz[off + i] - mg - (xp[off + i] - mean) * rstd * mgx);
          }
        }
      }
    });
  });
  return {gx, gg, gb};
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("task_batch_norm", &fastmeta::cpu::task_batch_norm);
  m.impl("task_batch_norm_backward", &fastmeta::cpu::task_batch_norm_backward);
}
