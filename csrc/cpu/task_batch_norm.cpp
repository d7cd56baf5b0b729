// CPU kernels of task_batch_norm: per-task, per-channel batch statistics (MAML's
// transductive BatchNorm), affine and activation fused, its backward and the backward's
// backward (the closed form of fastmeta/ops/task_batch_norm.py); and of
// task_batch_norm_max_pool2d (fastmeta/ops/task_batch_norm_max_pool2d.py), the same with
// the max pooling that alone reads its output inside its passes, on the same statistics.
// Grid: the forward and backward take a task's block of channels per work item (BatchNorm2d,
// channel_block) or a task (BatchNorm1d, task_grain); the double backward one (task,
// channel) slice. Each makes two passes over its values for the statistics and one or two
// more. Memory-bound.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "cpu_common.h"
#include "eager_nodes.h"

namespace fastmeta {
namespace cpu {
namespace {

struct BnShape {
  int64_t T, N, C, S;  // x viewed as [T, N, C, S], S = product of the spatial dims
};

BnShape check_bn(const at::Tensor& x, const c10::optional<at::Tensor>& gamma, const char* gamma_name) {
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  TORCH_CHECK_VALUE(x.dim() >= 3, "x must be [T, N, C, *spatial], got ", x.sizes());
  BnShape s{x.size(0), x.size(1), x.size(2), 1};
  for (int64_t d = 3; d < x.dim(); ++d) s.S *= x.size(d);
  if (gamma.has_value()) {
    // A per-channel parameter may have any strides (channel_param reads them): the
    // per-task rows of the flat [T, P] fast-weight buffer come as they are, uncopied.
    FM_CHECK_DEVICE(*gamma, kCPU);
    FM_CHECK_SAME_DTYPE(*gamma, x);
    TORCH_CHECK_VALUE((gamma->dim() == 1 && gamma->size(0) == s.C) ||
                    (gamma->dim() == 2 && gamma->size(0) == s.T && gamma->size(1) == s.C),
                gamma_name, " must be [C] or [T, C] with C = ", s.C, ", got ", gamma->sizes());
  }
  return s;
}

// Element (t, c) of a [C] or [T, C] parameter, at its strides (a task stride of 0: shared).
template <typename T>
inline T channel_param(const c10::optional<at::Tensor>& p, int64_t t, int64_t c, int64_t /*C*/, T fallback) {
  if (!p.has_value()) return fallback;
  const T* d = p->data_ptr<T>();
  return p->dim() == 1 ? d[c * p->stride(0)] : d[t * p->stride(0) + c * p->stride(1)];
}

int64_t grain_for(const BnShape& s) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(s.N * s.S, 1)); }

// The spatial layout (S > 1) in channel blocks. A (task, channel) slice is N rows of S
// values, C·S apart: walked slice by slice, each of its passes jumps between short rows
// (49 values at 7×7), and the first pass waits on the memory at every row. A work item
// here is a task's block of channels [c0, c1): each pass walks n, then c within the block,
// so consecutive rows are adjacent in memory (one run of (c1 − c0)·S values per example),
// and the block's values — `streams` tensors read per pass — stay within kBlockBytes, in
// L2 for the passes after the first. Two passes for the statistics (two-pass variance:
// the one-pass E[x²]−E[x]² loses ~7 digits in fp32 when |mean| ≫ std), per channel in the
// order n = 0, 1, …, each row's sum vectorised, then added.
constexpr int64_t kBlockBytes = 512 * 1024;

template <typename T>
int64_t channel_block(const BnShape& s, int64_t streams) {
  const int64_t per_channel = s.N * s.S * streams * int64_t(sizeof(T));
  return std::min<int64_t>(s.C, std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(per_channel, 1)));
}

// Mean and 1/√(var + eps) (biased variance) of channels [c0, c0 + cb) of task t. Rows
// shorter than kShortRow values are walked across the block's channels at a stride of S
// (vectorised over channels: see double_backward_blocks).
constexpr int64_t kShortRow = 16;

// Calls f(e, c) for every value e of channels [c0, c0 + cn) of task t (c counted from c0),
// in the short-row order: example n, then position i, then the channels at a stride of S,
// vectorised over the channels. Each channel's values come in the order n = 0, 1, …, i =
// 0, 1, …, as a row loop reads them.
template <typename F>
inline void across_channels(const BnShape& s, int64_t t, int64_t c0, int64_t cn, F&& f) {
  for (int64_t n = 0; n < s.N; ++n) {
    const int64_t base = ((t * s.N + n) * s.C + c0) * s.S;
    for (int64_t i = 0; i < s.S; ++i)
#pragma omp simd
      for (int64_t c = 0; c < cn; ++c) f(base + c * s.S + i, c);
  }
}

template <typename T>
void block_stats(const T* __restrict x, const BnShape& s, int64_t t, int64_t c0, int64_t cb, double eps,
                 T* __restrict mean, T* __restrict rstd) {
  const int64_t count = s.N * s.S, S = s.S;
  const bool short_rows = S < kShortRow;
  for (int64_t c = 0; c < cb; ++c) mean[c] = 0;
  if (short_rows) across_channels(s, t, c0, cb, [&](int64_t e, int64_t c) { mean[c] += x[e]; });
  for (int64_t n = 0; n < s.N && !short_rows; ++n) {
    const T* __restrict run = x + ((t * s.N + n) * s.C + c0) * S;
    for (int64_t c = 0; c < cb; ++c) {
      const T* row = run + c * S;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < S; ++i) sum += row[i];
      mean[c] += sum;
    }
  }
  for (int64_t c = 0; c < cb; ++c) {
    mean[c] /= T(count);
    rstd[c] = 0;
  }
  if (short_rows)
    across_channels(s, t, c0, cb, [&](int64_t e, int64_t c) { rstd[c] += (x[e] - mean[c]) * (x[e] - mean[c]); });
  for (int64_t n = 0; n < s.N && !short_rows; ++n) {
    const T* __restrict run = x + ((t * s.N + n) * s.C + c0) * S;
    for (int64_t c = 0; c < cb; ++c) {
      const T* row = run + c * S;
      const T m = mean[c];
      T sq = 0;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < S; ++i) sq += (row[i] - m) * (row[i] - m);
      rstd[c] += sq;
    }
  }
  for (int64_t c = 0; c < cb; ++c) rstd[c] = T(1) / std::sqrt(rstd[c] / T(count) + T(eps));
}

// BatchNorm1d (S = 1: x is [T, N, C], one value per example and channel). The (task,
// channel) slices above would each walk N values C apart, one at a time: at OmniglotFC's
// 32 × 5 × 256 that took ~1.8 ms a call (~200 ns a slice of 5 values). Here each task's
// block is N contiguous rows of C, and every pass runs along a row, so the channel loop
// vectorises: per-channel accumulators, summed over the rows in the same order (n = 0, 1,
// …) as the slice loop, with the same formulas.
inline bool is_features(const BnShape& s) { return s.S == 1; }

// Tasks per work item: about 16 K values, as grain_for.
int64_t task_grain(const BnShape& s) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(s.N * s.C, 1)); }

// Row t of a [C] or [T, C] parameter, at its strides, into out[C] (fallback where absent).
template <typename T>
void channel_row(const c10::optional<at::Tensor>& p, int64_t t, int64_t C, T fallback, T* out) {
  if (!p.has_value()) {
    std::fill(out, out + C, fallback);
    return;
  }
  const T* d = p->data_ptr<T>();
  const int64_t task_stride = p->dim() == 1 ? 0 : p->stride(0), stride = p->stride(p->dim() - 1);
  for (int64_t c = 0; c < C; ++c) out[c] = d[t * task_stride + c * stride];
}

// Mean and 1/√(var + eps) of each channel of task t's [N, C] block (block_stats' formulas).
template <typename T>
void row_stats(const T* xt, const BnShape& s, double eps, T* mean, T* rstd) {
  const int64_t C = s.C;
  std::fill(mean, mean + C, T(0));
  for (int64_t n = 0; n < s.N; ++n) {
    const T* row = xt + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) mean[c] += row[c];
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) mean[c] = mean[c] / T(s.N);
  std::fill(rstd, rstd + C, T(0));
  for (int64_t n = 0; n < s.N; ++n) {
    const T* row = xt + n * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) rstd[c] += (row[c] - mean[c]) * (row[c] - mean[c]);
  }
  for (int64_t c = 0; c < C; ++c) rstd[c] = T(1) / std::sqrt(rstd[c] / T(s.N) + T(eps));
}

// The backward ops' optional y and act (fastmeta/ops/task_batch_norm.py): the forward's
// output y with a piecewise-linear act, whose f'(y) the kernels apply to the gradient at y
// as they read it; or no y with act "none". A smooth act has a gradient at y: refused.
Act check_fused_activation(const c10::optional<at::Tensor>& y, const at::Tensor& x, c10::string_view act_name) {
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  if (!y.has_value()) {
    TORCH_CHECK_VALUE(act == Act::None, "act is '", act_name, "' but y is None: the backward needs y to apply f'");
    return act;
  }
  TORCH_CHECK_VALUE(act == Act::Relu || act == Act::LeakyRelu,
                    "act must be relu or leaky_relu when y is given, got '", act_name, "'");
  FM_CHECK_INPUT(*y, kCPU);
  FM_CHECK_SAME_DTYPE(*y, x);
  TORCH_CHECK_VALUE(y->sizes() == x.sizes(), "y must be ", x.sizes(), ", got ", y->sizes());
  return act;
}

// The gradient at z: g, or g·f'(y) where the op was given y.
// A is an ActConstant: none reads no y (the backward was given none).
template <typename T, typename A>
inline T masked(T g, const T* yp, int64_t i, A, T slope) {
  if constexpr (A::value == Act::None) {
    return g;
  } else {
    return g * act_derivative_from_output<T>(yp[i], A::value, slope);
  }
}

// The backward's addends (see task_batch_norm_backward below): dx_addend x's shape, read in
// x's layout (C-contiguous, as the launchers and the C++ nodes pass it), dgamma_addend
// [T, C] at its strides; each only for a needed output.
void check_backward_addends(const at::Tensor& x, const BnShape& s, bool need_x, bool need_gamma,
                            const c10::optional<at::Tensor>& dx_addend, const c10::optional<at::Tensor>& dgamma_addend) {
  if (dx_addend.has_value()) {
    FM_CHECK_INPUT(*dx_addend, kCPU);
    FM_CHECK_SAME_DTYPE(*dx_addend, x);
    TORCH_CHECK_VALUE(need_x && dx_addend->sizes() == x.sizes(), "dx_addend must be ", x.sizes(),
                      " and grad_x needed, got ", dx_addend->sizes());
  }
  if (dgamma_addend.has_value()) {
    FM_CHECK_INPUT(*dgamma_addend, kCPU);
    FM_CHECK_SAME_DTYPE(*dgamma_addend, x);
    TORCH_CHECK_VALUE(need_gamma && dgamma_addend->dim() == 2 && dgamma_addend->size(0) == s.T &&
                          dgamma_addend->size(1) == s.C,
                      "dgamma_addend must be [T, C] = [", s.T, ", ", s.C, "] and grad_gamma needed, got ",
                      dgamma_addend->sizes());
  }
}

at::Tensor task_batch_norm(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                           const c10::optional<at::Tensor>& beta, double eps, c10::string_view act_name,
                           double negative_slope) {
  const BnShape s = check_bn(x, gamma, "gamma");
  check_bn(x, beta, "beta");
  const Act act_value = parse_act(std::string(act_name.data(), act_name.size()));
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  dispatch_floating(x.scalar_type(), "task_batch_norm", [&](auto tag_) {
   dispatch_act(act_value, /*smooth=*/true, [&](auto act) {
    using scalar_t = decltype(tag_);
    using T_ = scalar_t;
    const T_* xp = x.data_ptr<T_>();
    T_* yp = y.data_ptr<T_>();
    const T_ slope = static_cast<T_>(negative_slope);
    if (is_features(s)) {
      at::parallel_for(0, s.T, task_grain(s), [&, xp, yp](int64_t t0, int64_t t1) {
        const T_* const xp_ = xp;  // locals: see the backward's slice loop
        T_* const yp_ = yp;
        std::vector<T_> mean(s.C), scale(s.C), shift(s.C);
        for (int64_t t = t0; t < t1; ++t) {
          const T_* xt = xp_ + t * s.N * s.C;
          T_* yt = yp_ + t * s.N * s.C;
          row_stats<T_>(xt, s, eps, mean.data(), scale.data());  // scale holds rstd here
          channel_row<T_>(gamma, t, s.C, T_(1), shift.data());  // and shift γ
          for (int64_t c = 0; c < s.C; ++c) scale[c] *= shift[c];
          channel_row<T_>(beta, t, s.C, T_(0), shift.data());  // shift β
          for (int64_t n = 0; n < s.N; ++n) {
            const T_* row = xt + n * s.C;
            T_* out = yt + n * s.C;
            // (x − μ)·(γ/σ) + β, not x·(γ/σ) + (β − μγ/σ): where |μ| ≫ σ the folded form's two
            // large terms cancel, which cost fp32 its digits (see task_batch_norm's forward below).
#pragma omp simd
            for (int64_t c = 0; c < s.C; ++c) out[c] = (row[c] - mean[c]) * scale[c] + shift[c];
            if (act != Act::None)
              for (int64_t c = 0; c < s.C; ++c) out[c] = act_forward<T_>(out[c], act, slope);
          }
        }
      });
      return;
    }
    const int64_t cb = channel_block<T_>(s, 1), blocks = (s.C + cb - 1) / cb;
    at::parallel_for(0, s.T * blocks, 1, [&, xp, yp](int64_t j0, int64_t j1) {
      const T_* const xp_ = xp;  // locals: see the backward's slice loop
      T_* const yp_ = yp;
      std::vector<T_> mean(cb), scale(cb), shift(cb);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / blocks, c0 = (j % blocks) * cb, cn = std::min(cb, s.C - c0);
        block_stats<T_>(xp_, s, t, c0, cn, eps, mean.data(), scale.data());  // scale holds rstd here
        for (int64_t c = 0; c < cn; ++c) {
          scale[c] *= channel_param<T_>(gamma, t, c0 + c, s.C, T_(1));
          shift[c] = channel_param<T_>(beta, t, c0 + c, s.C, T_(0));
        }
        // y = (x − μ)·(γ/σ) + β. Folded as x·(γ/σ) + (β − μγ/σ) it saved a subtraction, but
        // where |μ| ≫ σ (a channel nearly constant over a small batch: ResNet-12's last stage,
        // 5 examples at 2 × 2, after an inner step) the two large terms cancel: fp32 lost about
        // four digits there, and the meta-gradient was 10 % off the float64 one (float64 and the
        // reference were right; tests/l2l/test_l2l_modules.py, ResNet12).
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < cn; ++c) {
            const int64_t off = ((t * s.N + n) * s.C + c0 + c) * s.S;
            const T_ m = mean[c], a = scale[c], b = shift[c];
            const T_* __restrict src = xp_ + off;
            T_* __restrict dst = yp_ + off;
#pragma omp simd
            for (int64_t i = 0; i < s.S; ++i) dst[i] = act_forward<T_>((src[i] - m) * a + b, act, slope);
          }
      }
    });
   });
  });
  return y;
}

// dx_addend (x's shape) and dgamma_addend ([T, C]), when given, are added to grad_x and
// grad_gamma in their write passes: task_batch_norm's eager node passes the gradients its
// alias outputs of x and γ received, which autograd's engine would otherwise sum with x's
// and γ's gradients by an aten add each.
std::vector<at::Tensor> task_batch_norm_backward(const at::Tensor& grad_z, const at::Tensor& x,
                                                 const c10::optional<at::Tensor>& gamma, double eps,
                                                 const c10::List<bool>& needs, const c10::optional<at::Tensor>& y,
                                                 c10::string_view act_name, double negative_slope,
                                                 const c10::optional<at::Tensor>& dx_addend,
                                                 const c10::optional<at::Tensor>& dgamma_addend) {
  const BnShape s = check_bn(x, gamma, "gamma");
  const Act act_value = check_fused_activation(y, x, act_name);
  FM_CHECK_INPUT(grad_z, kCPU);
  FM_CHECK_SAME_DTYPE(grad_z, x);
  TORCH_CHECK_VALUE(grad_z.sizes() == x.sizes(), "grad_z must be ", x.sizes(), ", got ", grad_z.sizes());
  TORCH_CHECK_VALUE(needs.size() == 3, "needs must hold 3 flags, got ", needs.size());
  const bool need_x = needs.get(0), need_gamma = needs.get(1), need_beta = needs.get(2);
  check_backward_addends(x, s, need_x, need_gamma, dx_addend, dgamma_addend);
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need_x ? at::empty_like(x) : empty();
  at::Tensor gg = need_gamma ? at::empty({s.T, s.C}, x.options()) : empty();
  at::Tensor gb = need_beta ? at::empty({s.T, s.C}, x.options()) : empty();
  if (x.numel() == 0) {
    if (need_gamma) {
      if (dgamma_addend.has_value()) gg.copy_(*dgamma_addend); else gg.zero_();
    }
    if (need_beta) gb.zero_();
    return {gx, gg, gb};
  }
  dispatch_floating(x.scalar_type(), "task_batch_norm_backward", [&](auto tag_) {
   dispatch_act(act_value, /*smooth=*/false, [&](auto act) {
    using scalar_t = decltype(tag_);
    using T_ = scalar_t;
    const T_* xp = x.data_ptr<T_>();
    const T_* gz = grad_z.data_ptr<T_>();
    const T_* yp = y.has_value() ? y->data_ptr<T_>() : nullptr;
    const T_ slope = static_cast<T_>(negative_slope);
    T_* gxp = need_x ? gx.data_ptr<T_>() : nullptr;
    T_* ggp = need_gamma ? gg.data_ptr<T_>() : nullptr;
    T_* gbp = need_beta ? gb.data_ptr<T_>() : nullptr;
    const T_* axp = dx_addend.has_value() ? dx_addend->data_ptr<T_>() : nullptr;
    const T_* agp = dgamma_addend.has_value() ? dgamma_addend->data_ptr<T_>() : nullptr;
    const T_ count = T_(s.N * s.S);
    if (is_features(s)) {
      at::parallel_for(0, s.T, task_grain(s), [&, xp, gz, yp, gxp, axp](int64_t t0, int64_t t1) {
        const T_* const xp_ = xp;  // locals: see the slice loop below
        const T_* const gz_ = gz;
        const T_* const yp_ = yp;
        T_* const gxp_ = gxp;
        const T_* const axp_ = axp;
        std::vector<T_> mean(s.C), rstd(s.C), sum_g(s.C), sum_gx(s.C), scale(s.C);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t base = t * s.N * s.C;
          const T_* xt = xp_ + base;
          row_stats<T_>(xt, s, eps, mean.data(), rstd.data());
          std::fill(sum_g.begin(), sum_g.end(), T_(0));
          std::fill(sum_gx.begin(), sum_gx.end(), T_(0));
          for (int64_t n = 0; n < s.N; ++n) {
            const int64_t off = base + n * s.C;
#pragma omp simd
            for (int64_t c = 0; c < s.C; ++c) {
              const T_ g = masked<T_>(gz_[off + c], yp_, off + c, act, slope);
              sum_g[c] += g;
              sum_gx[c] += g * (xp_[off + c] - mean[c]) * rstd[c];
            }
          }
          if (ggp)
            for (int64_t c = 0; c < s.C; ++c) ggp[t * s.C + c] = sum_gx[c] + (agp ? agp[t * s.C + c] : T_(0));
          if (gbp) std::copy(sum_g.begin(), sum_g.end(), gbp + t * s.C);
          if (!gxp_) continue;
          channel_row<T_>(gamma, t, s.C, T_(1), scale.data());
          for (int64_t c = 0; c < s.C; ++c) {
            scale[c] *= rstd[c];
            sum_g[c] /= count;   // mean of g
            sum_gx[c] /= count;  // mean of g · x̂
          }
          for (int64_t n = 0; n < s.N; ++n) {
            const int64_t off = base + n * s.C;
#pragma omp simd
            for (int64_t c = 0; c < s.C; ++c)
              gxp_[off + c] = scale[c] * (masked<T_>(gz_[off + c], yp_, off + c, act, slope) - sum_g[c] -
                                         (xp_[off + c] - mean[c]) * rstd[c] * sum_gx[c]) +
                              (axp_ ? axp_[off + c] : T_(0));
          }
        }
      });
      return;
    }
    const int64_t cb = channel_block<T_>(s, yp ? 3 : 2), blocks = (s.C + cb - 1) / cb;
    at::parallel_for(0, s.T * blocks, 1, [&, xp, gz, yp, gxp, axp](int64_t j0, int64_t j1) {
      // The pointers as locals (captured by value, copied here): read through the closure,
      // gcc reloads them every element and leaves the sums scalar (3.6x slower at W2).
      const T_* const xp_ = xp;
      const T_* const gz_ = gz;
      const T_* const yp_ = yp;
      T_* const gxp_ = gxp;
      const T_* const axp_ = axp;
      std::vector<T_> mean(cb), rstd(cb), sum_g(cb), sum_gx(cb), scale_c(cb);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / blocks, c0 = (j % blocks) * cb, cn = std::min(cb, s.C - c0);
        block_stats<T_>(xp_, s, t, c0, cn, eps, mean.data(), rstd.data());
        std::fill(sum_g.begin(), sum_g.end(), T_(0));    // Σ grad_z
        std::fill(sum_gx.begin(), sum_gx.end(), T_(0));  // Σ grad_z · x̂
        const bool short_rows = s.S < kShortRow;  // across the channels at a stride of S (block_stats)
        T_* __restrict sg_ = sum_g.data();
        T_* __restrict sgx_ = sum_gx.data();
        const T_* __restrict mean_ = mean.data();
        const T_* __restrict rstd_ = rstd.data();
        if (short_rows)
          across_channels(s, t, c0, cn, [&](int64_t e, int64_t c) {
            const T_ g = masked<T_>(gz_[e], yp_, e, act, slope);
            sg_[c] += g;
            sgx_[c] += g * (xp_[e] - mean_[c]) * rstd_[c];
          });
        for (int64_t n = 0; n < s.N && !short_rows; ++n)
          for (int64_t c = 0; c < cn; ++c) {
            const int64_t off = ((t * s.N + n) * s.C + c0 + c) * s.S;
            const T_ m = mean[c], r = rstd[c];
            T_ row_g = 0, row_gx = 0;
#pragma omp simd reduction(+ : row_g, row_gx)
            for (int64_t i = 0; i < s.S; ++i) {
              const T_ g = masked<T_>(gz_[off + i], yp_, off + i, act, slope);
              row_g += g;
              row_gx += g * (xp_[off + i] - m) * r;
            }
            sum_g[c] += row_g;
            sum_gx[c] += row_gx;
          }
        for (int64_t c = 0; c < cn; ++c) {
          if (ggp) ggp[t * s.C + c0 + c] = sum_gx[c] + (agp ? agp[t * s.C + c0 + c] : T_(0));
          if (gbp) gbp[t * s.C + c0 + c] = sum_g[c];
        }
        if (!gxp_) continue;
        for (int64_t c = 0; c < cn; ++c) {
          sum_g[c] /= count;   // mean of g
          sum_gx[c] /= count;  // mean of g · x̂
          // γ/σ once per channel: channel_param per row (data_ptr's checks) cost W2's 2 × 2
          // layer ~70 ns a row of 4 values.
          scale_c[c] = rstd[c] * channel_param<T_>(gamma, t, c0 + c, s.C, T_(1));
        }
        const T_* __restrict scale_ = scale_c.data();
        if (short_rows)
          across_channels(s, t, c0, cn, [&](int64_t e, int64_t c) {
            gxp_[e] = scale_[c] * (masked<T_>(gz_[e], yp_, e, act, slope) - sg_[c] -
                                   (xp_[e] - mean_[c]) * rstd_[c] * sgx_[c]) +
                      (axp_ ? axp_[e] : T_(0));
          });
        for (int64_t n = 0; n < s.N && !short_rows; ++n)
          for (int64_t c = 0; c < cn; ++c) {
            const int64_t off = ((t * s.N + n) * s.C + c0 + c) * s.S;
            const T_ scale = scale_c[c];
            const T_ m = mean[c], r = rstd[c], mg = sum_g[c], mgx = sum_gx[c];
            if (axp_ != nullptr) {  // the addend in the write pass (a branch per row, not per element)
              const T_* __restrict add = axp_ + off;
#pragma omp simd
              for (int64_t i = 0; i < s.S; ++i)
                gxp_[off + i] = scale * (masked<T_>(gz_[off + i], yp_, off + i, act, slope) - mg -
                                         (xp_[off + i] - m) * r * mgx) + add[i];
            } else {
#pragma omp simd
              for (int64_t i = 0; i < s.S; ++i)
                gxp_[off + i] = scale * (masked<T_>(gz_[off + i], yp_, off + i, act, slope) - mg -
                                         (xp_[off + i] - m) * r * mgx);
            }
          }
      }
    });
   });
  });
  return {gx, gg, gb};
}

// The backward of task_batch_norm_backward: reference_task_batch_norm_double_backward's
// closed form. Per (task, channel), with d = x − μ, x̂ = d·rstd, g = grad_z, u = up_x:
// pass 1 takes μ, pass 2 every other sum (Σd², Σg, Σg·d, Σu, Σu·d, Σu·g) around it, pass 3
// writes the outputs, each an affine combination of g, u and d with per-(task, channel)
// coefficients. The mean has its own pass for the reason of block_stats: the sums about
// μ are what keep the cancellations of P(v) = v − mean(v) − x̂·mean(x̂v) and of
// K = <u, g> − M·mean(u)·mean(g) − ... small. Sums and coefficients are in double for
// float32 too: the fp32 reference reduces with pairwise sums, and a plain fp32 running sum
// over W4's 529 200 values per slice drifts by ~1e-4 relative, past the 1e-5 the kernel
// must match it to.
// With y (a piecewise-linear act), g = grad_z·f'(y) is read through masked(), and d grad_z
// is written times f'(y): the gradient at the op's first argument.
// The work items are a task's block of channels (channel_block, as the backward's): each
// pass walks n, then c within the block, so consecutive rows are adjacent in memory and the
// block's four read streams stay in L2 after the first pass. Per (task, channel) slices, each
// pass jumped between rows C·S apart and waited on the memory at every row (W2's first
// layer, 32 × 5 × 64 × 14 × 14: 4.5 ms a call). Where a row is shorter than kShortRow
// values (W2's 4 × 4 and 2 × 2 maps) the loops run along the block's channels at a stride
// of S instead of along each row, so that they vectorise across channels: a row of 4
// values was mostly a vector loop's set-up and its reduction's tail. Each channel's sums
// are taken in the same order either way: n = 0, 1, …, each row's values added in turn.

template <typename T, bool kGradSums, bool kUp, typename A>
void double_backward_blocks(const T* gz, const T* xp, const T* up, const BnShape& s, int64_t cb, int64_t blocks,
                            int64_t j0, int64_t j1, double eps, const c10::optional<at::Tensor>& gamma,
                            const c10::optional<at::Tensor>& up_gamma, const c10::optional<at::Tensor>& up_beta,
                            const T* yp, A act, T slope, T* d_gz, T* d_x, T* d_gamma) {
  const double M = double(s.N * s.S);
  const int64_t S = s.S;
  const bool short_rows = S < kShortRow;
  // Per channel of the block: the mean and the six sums, then the write pass's coefficients.
  std::vector<double> mean(cb), sdd(cb), sg(cb), sgd(cb), su(cb), sud(cb), sug(cb);
  std::vector<double> a(cb), zd(cb), z0(cb), alpha(cb), beta(cb), xd(cb), x0(cb);
  double* __restrict mean_ = mean.data();
  double* __restrict sdd_ = sdd.data();
  double* __restrict sg_ = sg.data();
  double* __restrict sgd_ = sgd.data();
  double* __restrict su_ = su.data();
  double* __restrict sud_ = sud.data();
  double* __restrict sug_ = sug.data();
  for (int64_t j = j0; j < j1; ++j) {
    const int64_t t = j / blocks, c0 = (j % blocks) * cb, cn = std::min(cb, s.C - c0);
    for (auto* v : {&mean, &sdd, &sg, &sgd, &su, &sud, &sug}) std::fill(v->begin(), v->begin() + cn, 0.0);
    // Pass 1: the means.
    if (short_rows) across_channels(s, t, c0, cn, [&](int64_t e, int64_t c) { mean_[c] += double(xp[e]); });
    for (int64_t n = 0; n < s.N && !short_rows; ++n) {
      const T* __restrict run = xp + ((t * s.N + n) * s.C + c0) * S;  // cn rows of S, adjacent
      for (int64_t c = 0; c < cn; ++c) {
        const T* __restrict row = run + c * S;
        double sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < S; ++i) sum += double(row[i]);
        mean_[c] += sum;
      }
    }
    for (int64_t c = 0; c < cn; ++c) mean_[c] /= M;
    // Pass 2: the sums about the mean.
    if (short_rows)
      across_channels(s, t, c0, cn, [&](int64_t e, int64_t c) {
        const double d = double(xp[e]) - mean_[c];
        sdd_[c] += d * d;
        if (kGradSums) {
          const double g = double(masked<T>(gz[e], yp, e, act, slope));
          sg_[c] += g;
          sgd_[c] += g * d;
          if (kUp) sug_[c] += double(up[e]) * g;
        }
        if (kUp) {
          const double u = double(up[e]);
          su_[c] += u;
          sud_[c] += u * d;
        }
      });
    for (int64_t n = 0; n < s.N && !short_rows; ++n) {
      const int64_t base = ((t * s.N + n) * s.C + c0) * S;
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t off = base + c * S;
        const double m = mean_[c];
        double r_dd = 0, r_g = 0, r_gd = 0, r_u = 0, r_ud = 0, r_ug = 0;
#pragma omp simd reduction(+ : r_dd, r_g, r_gd, r_u, r_ud, r_ug)
        for (int64_t i = 0; i < S; ++i) {
          const double d = double(xp[off + i]) - m;
          r_dd += d * d;
          if (kGradSums) {
            const double g = double(masked<T>(gz[off + i], yp, off + i, act, slope));
            r_g += g;
            r_gd += g * d;
            if (kUp) r_ug += double(up[off + i]) * g;
          }
          if (kUp) {
            const double u = double(up[off + i]);
            r_u += u;
            r_ud += u * d;
          }
        }
        sdd_[c] += r_dd;
        sg_[c] += r_g;
        sgd_[c] += r_gd;
        su_[c] += r_u;
        sud_[c] += r_ud;
        sug_[c] += r_ug;
      }
    }
    // The coefficients, per channel.
    for (int64_t c = 0; c < cn; ++c) {
      const double rstd = 1.0 / std::sqrt(sdd_[c] / M + eps);
      const double a_c = rstd * double(channel_param<T>(gamma, t, c0 + c, s.C, T(1)));
      const double u_gamma = double(channel_param<T>(up_gamma, t, c0 + c, s.C, T(0)));
      const double u_beta = double(channel_param<T>(up_beta, t, c0 + c, s.C, T(0)));
      const double mg = sg_[c] / M, gx = sgd_[c] * rstd / M;  // mean(g), mean(g·x̂)
      const double mu = su_[c] / M, ux = sud_[c] * rstd / M;  // mean(u), mean(u·x̂)
      const double k = sug_[c] / M - mu * mg - gx * ux;       // K / M
      if (d_gamma) d_gamma[t * s.C + c0 + c] = T(rstd * k * M);
      // d grad_z = a·P(u) + U_γ·x̂ + U_β = a·u + zd·d + z0
      a[c] = a_c;
      zd[c] = (u_gamma - a_c * ux) * rstd;
      z0[c] = u_beta - a_c * mu;
      // d x = α·P(g) − κ·x̂ − β·P(u) = α·g − β·u + xd·d + x0
      alpha[c] = rstd * (u_gamma - a_c * ux);
      beta[c] = rstd * a_c * gx;
      const double kappa = rstd * a_c * k;
      xd[c] = rstd * (beta[c] * ux - alpha[c] * gx - kappa);
      x0[c] = beta[c] * mu - alpha[c] * mg;
    }
    // Pass 3: the outputs.
    const double* __restrict a_ = a.data();
    const double* __restrict zd_ = zd.data();
    const double* __restrict z0_ = z0.data();
    const double* __restrict alpha_ = alpha.data();
    const double* __restrict beta_ = beta.data();
    const double* __restrict xd_ = xd.data();
    const double* __restrict x0_ = x0.data();
    if (short_rows && d_gz)
      across_channels(s, t, c0, cn, [&](int64_t e, int64_t c) {
        double v = zd_[c] * (double(xp[e]) - mean_[c]) + z0_[c];
        if (kUp) v += a_[c] * double(up[e]);
        d_gz[e] = masked<T>(T(v), yp, e, act, slope);
      });
    if (short_rows && d_x)
      across_channels(s, t, c0, cn, [&](int64_t e, int64_t c) {
        double v = xd_[c] * (double(xp[e]) - mean_[c]) + x0_[c] +
                   alpha_[c] * double(masked<T>(gz[e], yp, e, act, slope));
        if (kUp) v -= beta_[c] * double(up[e]);
        d_x[e] = T(v);
      });
    for (int64_t n = 0; n < s.N && !short_rows; ++n) {
      const int64_t base = ((t * s.N + n) * s.C + c0) * S;
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t off = base + c * S;
        const double m = mean_[c], a_c = a_[c], zd_c = zd_[c], z0_c = z0_[c];
        const double alpha_c = alpha_[c], beta_c = beta_[c], xd_c = xd_[c], x0_c = x0_[c];
        if (d_gz) {
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) {
            double v = zd_c * (double(xp[off + i]) - m) + z0_c;
            if (kUp) v += a_c * double(up[off + i]);
            d_gz[off + i] = masked<T>(T(v), yp, off + i, act, slope);
          }
        }
        if (d_x) {
#pragma omp simd
          for (int64_t i = 0; i < S; ++i) {
            double v = xd_c * (double(xp[off + i]) - m) + x0_c +
                       alpha_c * double(masked<T>(gz[off + i], yp, off + i, act, slope));
            if (kUp) v -= beta_c * double(up[off + i]);
            d_x[off + i] = T(v);
          }
        }
      }
    }
  }
}

// double_backward_blocks for BatchNorm1d (is_features): the same sums and coefficients,
// per task over its [N, C] block, with per-channel accumulators along the rows.
template <typename T, bool kGradSums, bool kUp, typename A>
void double_backward_rows(const T* gz, const T* xp, const T* up, const BnShape& s, int64_t t0, int64_t t1,
                          double eps, const c10::optional<at::Tensor>& gamma,
                          const c10::optional<at::Tensor>& up_gamma, const c10::optional<at::Tensor>& up_beta,
                          const T* yp, A act, T slope, T* d_gz, T* d_x, T* d_gamma) {
  const int64_t C = s.C;
  const double M = double(s.N);
  std::vector<double> mean(C), sdd(C), sg(C), sgd(C), su(C), sud(C), sug(C);
  std::vector<double> a(C), zd(C), z0(C), alpha(C), beta(C), xd(C), x0(C);
  std::vector<T> row_param(C);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t base = t * s.N * C;
    for (auto* v : {&mean, &sdd, &sg, &sgd, &su, &sud, &sug}) std::fill(v->begin(), v->end(), 0.0);
    for (int64_t n = 0; n < s.N; ++n) {
      const T* row = xp + base + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) mean[c] += double(row[c]);
    }
    for (int64_t c = 0; c < C; ++c) mean[c] /= M;
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t off = base + n * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const double d = double(xp[off + c]) - mean[c];
        sdd[c] += d * d;
        if (kGradSums) {
          const double g = double(masked<T>(gz[off + c], yp, off + c, act, slope));
          sg[c] += g;
          sgd[c] += g * d;
          if (kUp) sug[c] += double(up[off + c]) * g;
        }
        if (kUp) {
          const double u = double(up[off + c]);
          su[c] += u;
          sud[c] += u * d;
        }
      }
    }
    channel_row<T>(gamma, t, C, T(1), row_param.data());
    for (int64_t c = 0; c < C; ++c) a[c] = double(row_param[c]);
    channel_row<T>(up_gamma, t, C, T(0), row_param.data());
    for (int64_t c = 0; c < C; ++c) zd[c] = double(row_param[c]);  // U_γ, until replaced below
    channel_row<T>(up_beta, t, C, T(0), row_param.data());
    for (int64_t c = 0; c < C; ++c) {
      const double u_gamma = zd[c], u_beta = double(row_param[c]);
      const double rstd = 1.0 / std::sqrt(sdd[c] / M + eps);
      a[c] *= rstd;
      const double mg = sg[c] / M, gx = sgd[c] * rstd / M;
      const double mu = su[c] / M, ux = sud[c] * rstd / M;
      const double k = sug[c] / M - mu * mg - gx * ux;
      if (d_gamma) d_gamma[t * C + c] = T(rstd * k * M);
      zd[c] = (u_gamma - a[c] * ux) * rstd;
      z0[c] = u_beta - a[c] * mu;
      alpha[c] = rstd * (u_gamma - a[c] * ux);
      beta[c] = rstd * a[c] * gx;
      const double kappa = rstd * a[c] * k;
      xd[c] = rstd * (beta[c] * ux - alpha[c] * gx - kappa);
      x0[c] = beta[c] * mu - alpha[c] * mg;
    }
    for (int64_t n = 0; n < s.N; ++n) {
      const int64_t off = base + n * C;
      if (d_gz) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = double(xp[off + c]) - mean[c];
          double v = zd[c] * d + z0[c];
          if (kUp) v += a[c] * double(up[off + c]);
          d_gz[off + c] = masked<T>(T(v), yp, off + c, act, slope);
        }
      }
      if (d_x) {
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = double(xp[off + c]) - mean[c];
          double v = xd[c] * d + x0[c] + alpha[c] * double(masked<T>(gz[off + c], yp, off + c, act, slope));
          if (kUp) v -= beta[c] * double(up[off + c]);
          d_x[off + c] = T(v);
        }
      }
    }
  }
}

std::vector<at::Tensor> task_batch_norm_double_backward(
    const at::Tensor& grad_z, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
    const c10::optional<at::Tensor>& up_x, const c10::optional<at::Tensor>& up_gamma,
    const c10::optional<at::Tensor>& up_beta, double eps, const c10::List<bool>& needs,
    const c10::optional<at::Tensor>& y, c10::string_view act_name, double negative_slope) {
  const BnShape s = check_bn(x, gamma, "gamma");
  const Act act_value = check_fused_activation(y, x, act_name);
  check_bn(x, up_gamma, "up_gamma");
  check_bn(x, up_beta, "up_beta");
  FM_CHECK_INPUT(grad_z, kCPU);
  FM_CHECK_SAME_DTYPE(grad_z, x);
  TORCH_CHECK_VALUE(grad_z.sizes() == x.sizes(), "grad_z must be ", x.sizes(), ", got ", grad_z.sizes());
  if (up_x.has_value()) {
    FM_CHECK_INPUT(*up_x, kCPU);
    FM_CHECK_SAME_DTYPE(*up_x, x);
    TORCH_CHECK_VALUE(up_x->sizes() == x.sizes(), "up_x must be ", x.sizes(), ", got ", up_x->sizes());
  }
  TORCH_CHECK_VALUE(needs.size() == 3, "needs must hold 3 flags, got ", needs.size());
  const bool need_gz = needs.get(0), need_x = needs.get(1), need_gamma = needs.get(2);
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor d_gz = need_gz ? at::empty_like(x) : empty();
  at::Tensor d_x = need_x ? at::empty_like(x) : empty();
  at::Tensor d_gamma = need_gamma ? at::empty({s.T, s.C}, x.options()) : empty();
  dispatch_floating(x.scalar_type(), "task_batch_norm_double_backward", [&](auto tag_) {
   dispatch_act(act_value, /*smooth=*/false, [&](auto act) {
    using T_ = decltype(tag_);
    T_* dgz = need_gz ? d_gz.data_ptr<T_>() : nullptr;
    T_* dxp = need_x ? d_x.data_ptr<T_>() : nullptr;
    T_* dgam = need_gamma ? d_gamma.data_ptr<T_>() : nullptr;
    if (x.numel() == 0) {  // no examples: no sums, a zero gradient at γ (no aten call: not a dispatch)
      for (int64_t j = 0; dgam && j < s.T * s.C; ++j) dgam[j] = T_(0);
      return;
    }
    const T_* xp = x.data_ptr<T_>();
    const T_* gz = grad_z.data_ptr<T_>();
    const T_* up = up_x.has_value() ? up_x->data_ptr<T_>() : nullptr;
    const T_* yp = y.has_value() ? y->data_ptr<T_>() : nullptr;
    const T_ slope = static_cast<T_>(negative_slope);
    // d x and d γ read the sums of g; d grad_z alone does not.
    const bool grad_sums = need_x || need_gamma;
    const bool features = is_features(s);
    // The spatial layout's work items: a task's block of channels, its four read streams
    // within kBlockBytes (double_backward_blocks).
    const int64_t cb = features ? 1 : channel_block<T_>(s, 4), blocks = features ? 1 : (s.C + cb - 1) / cb;
    at::parallel_for(0, features ? s.T : s.T * blocks, features ? task_grain(s) : 1, [&](int64_t j0, int64_t j1) {
      auto run = [&](auto grad_sums_tag, auto up_tag) {
        constexpr bool kGradSums = decltype(grad_sums_tag)::value, kUp = decltype(up_tag)::value;
        if (features)  // j0, j1: tasks
          double_backward_rows<T_, kGradSums, kUp>(gz, xp, up, s, j0, j1, eps, gamma, up_gamma, up_beta, yp, act,
                                                   slope, dgz, dxp, dgam);
        else  // j0, j1: (task, channel block) items
          double_backward_blocks<T_, kGradSums, kUp>(gz, xp, up, s, cb, blocks, j0, j1, eps, gamma, up_gamma, up_beta,
                                                     yp, act, slope, dgz, dxp, dgam);
      };
      using Yes = std::true_type;
      using No = std::false_type;
      if (grad_sums && up) run(Yes{}, Yes{});
      else if (grad_sums) run(Yes{}, No{});
      else if (up) run(No{}, Yes{});
      else run(No{}, No{});
    });
   });
  });
  return {d_gz, d_x, d_gamma};
}

// ---------------------------------------------------------------------------------------
// task_batch_norm_max_pool2d (fastmeta/ops/task_batch_norm_max_pool2d.py): a BatchNorm
// whose output only a max pooling of k×k windows, stride k, no padding reads. x is
// [T, N, C, H, W]; the pooled maps and their indices [T, N, C, HO, WO], HO = H / k. The
// windows do not overlap, so the full-size output is never written: the forward takes each
// window's maximum of the normalised, activated values in its write pass; the backward
// and the double backward read the gradient from the pooled maps, where each window's
// maximum has its window's gradient and every other element none (a sparse gradient: its
// sums run over the windows, the dense write pass takes it as 0 and the windows' maxima
// are written again with theirs).
// ---------------------------------------------------------------------------------------

struct PoolShape {
  int64_t H, W, k, HO, WO;
};

PoolShape check_pooled_block(const at::Tensor& x, int64_t kernel_size, c10::string_view act_name, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 5, op, ": x must be [T, N, C, H, W], got ", x.sizes());
  const int64_t H = x.size(3), W = x.size(4);
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size <= H && kernel_size <= W, op,
                    ": kernel_size must be at least 1 and at most the map's height and width, got ", kernel_size);
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  TORCH_CHECK_VALUE(act == Act::None || act == Act::Relu || act == Act::LeakyRelu, op,
                    ": act must be none, relu or leaky_relu, got '", act_name, "'");
  return {H, W, kernel_size, H / kernel_size, W / kernel_size};
}

void check_pooled_maps(const at::Tensor& x, const PoolShape& p, const at::Tensor& t, const char* name, bool int64) {
  FM_CHECK_INPUT(t, kCPU);
  if (int64) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, " must be int64, got ", t.scalar_type());
  } else {
    FM_CHECK_SAME_DTYPE(t, x);
  }
  TORCH_CHECK_VALUE(t.dim() == 5 && t.size(0) == x.size(0) && t.size(1) == x.size(1) && t.size(2) == x.size(2) &&
                        t.size(3) == p.HO && t.size(4) == p.WO,
                    name, " must be [T, N, C, ", p.HO, ", ", p.WO, "], got ", t.sizes());
}

// One tap of a row of windows: the normalised, activated value at src[ow·k] (as the
// forward's write pass computes y) against the running maximum, as max_pool2d's kernel
// takes it (a NaN always; the first maximum in row-major order). Branch-free, restrict
// pointers: gcc vectorises it.
template <typename T, typename A>
void take_normalised_tap(const T* __restrict src, int64_t base, int64_t k, int64_t wo, T m, T a, T b, A act, T slope,
                         T* __restrict row_y, int64_t* __restrict row_i) {
#pragma omp simd
  for (int64_t ow = 0; ow < wo; ++ow) {
    const T v = act_forward<T>((src[ow * k] - m) * a + b, A::value, slope);
    const bool take = v > row_y[ow] || v != v;
    row_y[ow] = take ? v : row_y[ow];
    row_i[ow] = take ? base + ow * k : row_i[ow];
  }
}

// The gradient at z of a pooled block's channels [c0, c0 + cn) of task t, in x's layout
// ([N, cn, S]): each window's upstream times f' of its pooled value at the window's maximum
// (the indices), 0 everywhere else (max_pool2d_backward's scatter: the windows do not overlap).
template <typename T, typename A>
void scatter_pooled_gradient(const T* gp, const T* pooled, const int64_t* indices, const BnShape& s, int64_t PS,
                             int64_t t, int64_t c0, int64_t cn, A act, T slope, T* out) {
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t c = 0; c < cn; ++c) {
      T* __restrict dst = out + (n * cn + c) * s.S;
      std::fill(dst, dst + s.S, T(0));
      const int64_t q0 = ((t * s.N + n) * s.C + c0 + c) * PS;
      for (int64_t q = 0; q < PS; ++q) dst[indices[q0 + q]] = masked<T>(gp[q0 + q], pooled, q0 + q, act, slope);
    }
}

// A row of 2×2 windows at once (the common pooling): the four taps of each window in
// registers, in row-major order, one store of the value and of the index per window. The
// taps read two rows as interleaved pairs, which gcc vectorises; take_normalised_tap's
// four calls per row each walk WO strided values (CNN4's 16: loop overhead dominated).
template <typename T, typename A>
void take_normalised_pairs(const T* __restrict r0, const T* __restrict r1, int64_t base, int64_t W, int64_t wo, T m,
                           T a, T b, A act, T slope, T* __restrict row_y, int64_t* __restrict row_i) {
#pragma omp simd
  for (int64_t ow = 0; ow < wo; ++ow) {
    const T v0 = act_forward<T>((r0[2 * ow] - m) * a + b, A::value, slope);
    const T v1 = act_forward<T>((r0[2 * ow + 1] - m) * a + b, A::value, slope);
    const T v2 = act_forward<T>((r1[2 * ow] - m) * a + b, A::value, slope);
    const T v3 = act_forward<T>((r1[2 * ow + 1] - m) * a + b, A::value, slope);
    T best = -std::numeric_limits<T>::infinity();
    int64_t at = 0;
    bool take = v0 > best || v0 != v0;
    best = take ? v0 : best;
    take = v1 > best || v1 != v1;
    best = take ? v1 : best;
    at = take ? 1 : at;
    take = v2 > best || v2 != v2;
    best = take ? v2 : best;
    at = take ? W : at;
    take = v3 > best || v3 != v3;
    best = take ? v3 : best;
    at = take ? W + 1 : at;
    row_y[ow] = best;
    row_i[ow] = base + 2 * ow + at;
  }
}

std::vector<at::Tensor> task_batch_norm_max_pool2d(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                                                   const c10::optional<at::Tensor>& beta, double eps,
                                                   c10::string_view act_name, double negative_slope,
                                                   int64_t kernel_size) {
  const BnShape s = check_bn(x, gamma, "gamma");
  check_bn(x, beta, "beta");
  const PoolShape p = check_pooled_block(x, kernel_size, act_name, "task_batch_norm_max_pool2d");
  TORCH_CHECK_VALUE(x.is_contiguous(), "task_batch_norm_max_pool2d: x must be contiguous");
  const Act act_value = parse_act(std::string(act_name.data(), act_name.size()));
  at::Tensor pooled = at::empty({s.T, s.N, s.C, p.HO, p.WO}, x.options());
  at::Tensor indices = at::empty({s.T, s.N, s.C, p.HO, p.WO}, x.options().dtype(at::kLong));
  if (pooled.numel() == 0) return {pooled, indices};
  const int64_t PS = p.HO * p.WO;
  dispatch_floating(x.scalar_type(), "task_batch_norm_max_pool2d", [&](auto tag_) {
   dispatch_act(act_value, /*smooth=*/false, [&](auto act) {
    using T_ = decltype(tag_);
    const T_* xp = x.data_ptr<T_>();
    T_* pp = pooled.data_ptr<T_>();
    int64_t* ip = indices.data_ptr<int64_t>();
    const T_ slope = static_cast<T_>(negative_slope);
    const int64_t cb = channel_block<T_>(s, 1), blocks = (s.C + cb - 1) / cb;
    at::parallel_for(0, s.T * blocks, 1, [&, xp, pp, ip](int64_t j0, int64_t j1) {
      const T_* const xp_ = xp;
      T_* const pp_ = pp;
      int64_t* const ip_ = ip;
      std::vector<T_> mean(cb), scale(cb), shift(cb);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / blocks, c0 = (j % blocks) * cb, cn = std::min(cb, s.C - c0);
        block_stats<T_>(xp_, s, t, c0, cn, eps, mean.data(), scale.data());  // scale holds rstd here
        for (int64_t c = 0; c < cn; ++c) {
          scale[c] *= channel_param<T_>(gamma, t, c0 + c, s.C, T_(1));
          shift[c] = channel_param<T_>(beta, t, c0 + c, s.C, T_(0));
        }
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < cn; ++c) {
            const int64_t plane = (t * s.N + n) * s.C + c0 + c;
            const T_* src = xp_ + plane * s.S;
            for (int64_t oh = 0; oh < p.HO; ++oh) {
              T_* row_y = pp_ + plane * PS + oh * p.WO;
              int64_t* row_i = ip_ + plane * PS + oh * p.WO;
              if (p.k == 2) {
                const int64_t at0 = 2 * oh * p.W;
                take_normalised_pairs<T_>(src + at0, src + at0 + p.W, at0, p.W, p.WO, mean[c], scale[c], shift[c], act,
                                          slope, row_y, row_i);
                continue;
              }
              for (int64_t ow = 0; ow < p.WO; ++ow) {
                row_y[ow] = -std::numeric_limits<T_>::infinity();
                row_i[ow] = oh * p.k * p.W + ow * p.k;
              }
              for (int64_t a = 0; a < p.k; ++a)
                for (int64_t b = 0; b < p.k; ++b) {
                  const int64_t at0 = (oh * p.k + a) * p.W + b;
                  take_normalised_tap<T_>(src + at0, at0, p.k, p.WO, mean[c], scale[c], shift[c], act, slope, row_y,
                                          row_i);
                }
            }
          }
      }
    });
   });
  });
  return {pooled, indices};
}

std::vector<at::Tensor> task_batch_norm_max_pool2d_backward(
    const at::Tensor& grad_pooled, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
    const at::Tensor& pooled, const at::Tensor& indices, double eps, const c10::List<bool>& needs,
    c10::string_view act_name, double negative_slope, int64_t kernel_size, const c10::optional<at::Tensor>& dx_addend,
    const c10::optional<at::Tensor>& dgamma_addend) {
  const char* op = "task_batch_norm_max_pool2d_backward";
  const BnShape s = check_bn(x, gamma, "gamma");
  const PoolShape p = check_pooled_block(x, kernel_size, act_name, op);
  check_pooled_maps(x, p, grad_pooled, "grad_pooled", false);
  check_pooled_maps(x, p, pooled, "pooled", false);
  check_pooled_maps(x, p, indices, "indices", true);
  TORCH_CHECK_VALUE(x.is_contiguous() && grad_pooled.is_contiguous() && pooled.is_contiguous() &&
                        indices.is_contiguous(), op, ": the tensors must be contiguous");
  TORCH_CHECK_VALUE(needs.size() == 3, "needs must hold 3 flags, got ", needs.size());
  const Act act_value = parse_act(std::string(act_name.data(), act_name.size()));
  const bool need_x = needs.get(0), need_gamma = needs.get(1), need_beta = needs.get(2);
  check_backward_addends(x, s, need_x, need_gamma, dx_addend, dgamma_addend);
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor gx = need_x ? at::empty_like(x) : empty();
  at::Tensor gg = need_gamma ? at::empty({s.T, s.C}, x.options()) : empty();
  at::Tensor gb = need_beta ? at::empty({s.T, s.C}, x.options()) : empty();
  const int64_t PS = p.HO * p.WO;
  dispatch_floating(x.scalar_type(), op, [&](auto tag_) {
   dispatch_act(act_value, /*smooth=*/false, [&](auto act) {
    using T_ = decltype(tag_);
    const T_* xp = x.data_ptr<T_>();
    const T_* gp = grad_pooled.data_ptr<T_>();
    const T_* yp = pooled.data_ptr<T_>();  // y at each window's maximum: f' from it
    const int64_t* ip = indices.data_ptr<int64_t>();
    const T_ slope = static_cast<T_>(negative_slope);
    T_* gxp = need_x ? gx.data_ptr<T_>() : nullptr;
    T_* ggp = need_gamma ? gg.data_ptr<T_>() : nullptr;
    T_* gbp = need_beta ? gb.data_ptr<T_>() : nullptr;
    const T_* axp = dx_addend.has_value() ? dx_addend->data_ptr<T_>() : nullptr;
    const T_* agp = dgamma_addend.has_value() ? dgamma_addend->data_ptr<T_>() : nullptr;
    const T_ count = T_(s.N * s.S);
    // The block's g (x's layout, a channel block of one task) in a buffer that stays in the
    // cache: task_batch_norm_backward's loops then read it where they read grad_z·f'(y).
    const int64_t cb = channel_block<T_>(s, 3), blocks = (s.C + cb - 1) / cb;
    at::parallel_for(0, s.T * blocks, 1, [&, xp, gp, yp, ip, gxp, axp](int64_t j0, int64_t j1) {
      const T_* const xp_ = xp;
      T_* const gxp_ = gxp;
      const T_* const axp_ = axp;
      std::vector<T_> mean(cb), rstd(cb), sum_g(cb), sum_gx(cb), rstd_gamma(cb), block_g(s.N * cb * s.S);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / blocks, c0 = (j % blocks) * cb, cn = std::min(cb, s.C - c0);
        block_stats<T_>(xp_, s, t, c0, cn, eps, mean.data(), rstd.data());
        scatter_pooled_gradient<T_>(gp, yp, ip, s, PS, t, c0, cn, act, slope, block_g.data());
        std::fill(sum_g.begin(), sum_g.end(), T_(0));
        std::fill(sum_gx.begin(), sum_gx.end(), T_(0));
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < cn; ++c) {
            const int64_t off = ((t * s.N + n) * s.C + c0 + c) * s.S;
            const T_* __restrict g = block_g.data() + (n * cn + c) * s.S;
            const T_ m = mean[c], r = rstd[c];
            T_ row_g = 0, row_gx = 0;
#pragma omp simd reduction(+ : row_g, row_gx)
            for (int64_t i = 0; i < s.S; ++i) {
              row_g += g[i];
              row_gx += g[i] * (xp_[off + i] - m) * r;
            }
            sum_g[c] += row_g;
            sum_gx[c] += row_gx;
          }
        for (int64_t c = 0; c < cn; ++c) {
          if (ggp) ggp[t * s.C + c0 + c] = sum_gx[c] + (agp ? agp[t * s.C + c0 + c] : T_(0));
          if (gbp) gbp[t * s.C + c0 + c] = sum_g[c];
        }
        if (!gxp_) continue;
        for (int64_t c = 0; c < cn; ++c) {
          sum_g[c] /= count;
          sum_gx[c] /= count;
          rstd_gamma[c] = rstd[c] * channel_param<T_>(gamma, t, c0 + c, s.C, T_(1));  // once per channel
        }
        for (int64_t n = 0; n < s.N; ++n)
          for (int64_t c = 0; c < cn; ++c) {
            const int64_t off = ((t * s.N + n) * s.C + c0 + c) * s.S;
            const T_* __restrict g = block_g.data() + (n * cn + c) * s.S;
            const T_ scale = rstd_gamma[c];
            const T_ m = mean[c], r = rstd[c], mg = sum_g[c], mgx = sum_gx[c];
            if (axp_ != nullptr) {
              const T_* __restrict add = axp_ + off;
#pragma omp simd
              for (int64_t i = 0; i < s.S; ++i)
                gxp_[off + i] = scale * (g[i] - mg - (xp_[off + i] - m) * r * mgx) + add[i];
            } else {
#pragma omp simd
              for (int64_t i = 0; i < s.S; ++i) gxp_[off + i] = scale * (g[i] - mg - (xp_[off + i] - m) * r * mgx);
            }
          }
      }
    });
   });
  });
  return {gx, gg, gb};
}

// The backward of the backward: double_backward_blocks' sums and coefficients, per
// (task, channel) slice, with g read from the windows' maxima (the sums of g over them)
// and d grad_pooled written at each window from its maximum's element.
std::vector<at::Tensor> task_batch_norm_max_pool2d_double_backward(
    const at::Tensor& grad_pooled, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
    const at::Tensor& pooled, const at::Tensor& indices, const c10::optional<at::Tensor>& up_x,
    const c10::optional<at::Tensor>& up_gamma, const c10::optional<at::Tensor>& up_beta, double eps,
    const c10::List<bool>& needs, c10::string_view act_name, double negative_slope, int64_t kernel_size) {
  const char* op = "task_batch_norm_max_pool2d_double_backward";
  const BnShape s = check_bn(x, gamma, "gamma");
  const PoolShape p = check_pooled_block(x, kernel_size, act_name, op);
  check_bn(x, up_gamma, "up_gamma");
  check_bn(x, up_beta, "up_beta");
  check_pooled_maps(x, p, grad_pooled, "grad_pooled", false);
  check_pooled_maps(x, p, pooled, "pooled", false);
  check_pooled_maps(x, p, indices, "indices", true);
  TORCH_CHECK_VALUE(x.is_contiguous() && grad_pooled.is_contiguous() && pooled.is_contiguous() &&
                        indices.is_contiguous(), op, ": the tensors must be contiguous");
  if (up_x.has_value()) {
    FM_CHECK_INPUT(*up_x, kCPU);
    FM_CHECK_SAME_DTYPE(*up_x, x);
    TORCH_CHECK_VALUE(up_x->sizes() == x.sizes() && up_x->is_contiguous(), "up_x must be ", x.sizes(),
                      ", contiguous, got ", up_x->sizes());
  }
  TORCH_CHECK_VALUE(needs.size() == 3, "needs must hold 3 flags, got ", needs.size());
  const Act act_value = parse_act(std::string(act_name.data(), act_name.size()));
  const bool need_gp = needs.get(0), need_x = needs.get(1), need_gamma = needs.get(2);
  auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor d_gp = need_gp ? at::empty_like(pooled) : empty();
  at::Tensor d_x = need_x ? at::empty_like(x) : empty();
  at::Tensor d_gamma = need_gamma ? at::empty({s.T, s.C}, x.options()) : empty();
  const int64_t PS = p.HO * p.WO;
  dispatch_floating(x.scalar_type(), op, [&](auto tag_) {
   dispatch_act(act_value, /*smooth=*/false, [&](auto act) {
    using T_ = decltype(tag_);
    const T_* xp = x.data_ptr<T_>();
    const T_* gp = grad_pooled.data_ptr<T_>();
    const T_* yp = pooled.data_ptr<T_>();
    const int64_t* ip = indices.data_ptr<int64_t>();
    const T_* up = up_x.has_value() ? up_x->data_ptr<T_>() : nullptr;
    const T_ slope = static_cast<T_>(negative_slope);
    T_* dgp = need_gp ? d_gp.data_ptr<T_>() : nullptr;
    T_* dxp = need_x ? d_x.data_ptr<T_>() : nullptr;
    T_* dgam = need_gamma ? d_gamma.data_ptr<T_>() : nullptr;
    const double M = double(s.N * s.S);
    // The slice's g in a buffer ([N, S], in the cache): double_backward_blocks' loops read
    // it where they read grad_z·f'(y); d grad_z is computed at each window's maximum only.
    at::parallel_for(0, s.T * s.C, grain_for(s), [&](int64_t j0, int64_t j1) {
      std::vector<T_> slice_g(s.N * s.S);
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / s.C, c = j % s.C;
        scatter_pooled_gradient<T_>(gp, yp, ip, BnShape{s.T, s.N, s.C, s.S}, PS, t, c, 1, act, slope, slice_g.data());
        double sum_x = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const T_* row = xp + ((t * s.N + n) * s.C + c) * s.S;
#pragma omp simd reduction(+ : sum_x)
          for (int64_t i = 0; i < s.S; ++i) sum_x += double(row[i]);
        }
        const double mean = sum_x / M;
        double sdd = 0, sg = 0, sgd = 0, su = 0, sud = 0, sug = 0;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t off = ((t * s.N + n) * s.C + c) * s.S;
          const T_* __restrict g = slice_g.data() + n * s.S;
          if (up) {
#pragma omp simd reduction(+ : sdd, sg, sgd, su, sud, sug)
            for (int64_t i = 0; i < s.S; ++i) {
              const double d = double(xp[off + i]) - mean, gi = double(g[i]), u = double(up[off + i]);
              sdd += d * d;
              sg += gi;
              sgd += gi * d;
              sug += u * gi;
              su += u;
              sud += u * d;
            }
          } else {
#pragma omp simd reduction(+ : sdd, sg, sgd)
            for (int64_t i = 0; i < s.S; ++i) {
              const double d = double(xp[off + i]) - mean, gi = double(g[i]);
              sdd += d * d;
              sg += gi;
              sgd += gi * d;
            }
          }
        }
        const double rstd = 1.0 / std::sqrt(sdd / M + eps);
        const double a = rstd * double(channel_param<T_>(gamma, t, c, s.C, T_(1)));
        const double u_gamma = double(channel_param<T_>(up_gamma, t, c, s.C, T_(0)));
        const double u_beta = double(channel_param<T_>(up_beta, t, c, s.C, T_(0)));
        const double mg = sg / M, gx = sgd * rstd / M;
        const double mu = su / M, ux = sud * rstd / M;
        const double k = sug / M - mu * mg - gx * ux;
        if (dgam) dgam[j] = T_(rstd * k * M);
        const double zd = (u_gamma - a * ux) * rstd, z0 = u_beta - a * mu;
        const double alpha = rstd * (u_gamma - a * ux), beta = rstd * a * gx, kappa = rstd * a * k;
        const double xd = rstd * (beta * ux - alpha * gx - kappa), x0 = beta * mu - alpha * mg;
        for (int64_t n = 0; n < s.N; ++n) {
          const int64_t plane = (t * s.N + n) * s.C + c;
          const int64_t off = plane * s.S, q0 = plane * PS;
          const T_* __restrict g = slice_g.data() + n * s.S;
          if (dgp) {  // d grad_z at each window's maximum: the window's value
            for (int64_t q = 0; q < PS; ++q) {
              const int64_t i = off + ip[q0 + q];
              double v = zd * (double(xp[i]) - mean) + z0;
              if (up) v += a * double(up[i]);
              dgp[q0 + q] = masked<T_>(T_(v), yp, q0 + q, act, slope);
            }
          }
          if (dxp) {
            if (up) {
#pragma omp simd
              for (int64_t i = 0; i < s.S; ++i)
                dxp[off + i] = T_(xd * (double(xp[off + i]) - mean) + x0 + alpha * double(g[i]) -
                                  beta * double(up[off + i]));
            } else {
#pragma omp simd
              for (int64_t i = 0; i < s.S; ++i)
                dxp[off + i] = T_(xd * (double(xp[off + i]) - mean) + x0 + alpha * double(g[i]));
            }
          }
        }
      }
    });
   });
  });
  return {d_gp, d_x, d_gamma};
}

// ---------------------------------------------------------------------------------------
// The eager path's autograd nodes in C++ (see task_conv2d.cpp): task_batch_norm and
// task_batch_norm_backward, what fastmeta/ops/task_batch_norm.py's Python nodes do, for the
// activations the backward kernel applies itself ("none" and the mask activations, whose
// f'(y) is piecewise constant: no gradient at y). The public op takes them where
// fastmeta/ops/task_batch_norm.py's `_bn_native_node` says.
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

// What a BatchNorm backward op's node (TaskBatchNormBackwardNode, and the pooled block's)
// reads in its backward: the upstream of grad_x, grad_γ and grad_β where each carries
// something, the addends' gradients (those upstreams unchanged), and which of grad_z (or
// grad_pooled), x and γ to differentiate. `edges` holds the node's tensor arguments' edge
// indices, the addends' at `addend_edge` and after it.
struct BnBackwardUpstream {
  at::Tensor up_x, up_gamma, up_beta, d_x_addend, d_gamma_addend;
  bool d_grad, d_x, d_gamma;
};

BnBackwardUpstream bn_backward_upstream(AutogradContext* ctx, const variable_list& upstreams, bool has_gamma,
                                        size_t addend_edge) {
  const auto needs = ctx->saved_data["needs"].toBoolList();
  const auto edges = ctx->saved_data["edges"].toIntVector();
  BnBackwardUpstream u;
  u.up_x = upstream(upstreams[0], needs.get(0));
  u.up_gamma = upstream(upstreams[1], needs.get(1));
  u.up_beta = upstream(upstreams[2], needs.get(2));
  if (needs_grad(ctx, edges[addend_edge])) u.d_x_addend = u.up_x;
  if (needs_grad(ctx, edges[addend_edge + 1])) u.d_gamma_addend = u.up_gamma;
  u.d_grad = needs_grad(ctx, edges[0]);
  u.d_x = needs_grad(ctx, edges[1]);
  u.d_gamma = has_gamma && needs_grad(ctx, edges[2]);
  return u;
}

// What a BatchNorm layer's node (TaskBatchNormNode, and the pooled block's) reads in its
// backward: which of x, γ and β need a gradient, and γ's and β's ranks (0: absent).
struct BnLayerNeeds {
  bool x, gamma, beta;
  int64_t gamma_dim, beta_dim;
  bool any() const { return x || gamma || beta; }
};

BnLayerNeeds bn_layer_needs(AutogradContext* ctx) {
  const auto edges = ctx->saved_data["edges"].toIntVector();
  BnLayerNeeds n;
  n.gamma_dim = ctx->saved_data["gamma_dim"].toInt();
  n.beta_dim = ctx->saved_data["beta_dim"].toInt();
  n.x = needs_grad(ctx, edges[0]);
  n.gamma = n.gamma_dim > 0 && needs_grad(ctx, edges[1]);
  n.beta = n.beta_dim > 0 && needs_grad(ctx, edges[2]);
  return n;
}

// The backward op's [grad_x, grad_γ, grad_β] as the layer's gradients: those not needed
// undefined, a shared γ's and β's summed over the tasks (a shared γ's alias gradient added
// after the sum: the kernel's addend is per task).
std::vector<at::Tensor> bn_layer_grads(const variable_list& out, const BnLayerNeeds& n, const at::Tensor& add_gamma) {
  at::Tensor grad_x = n.x ? out[0] : at::Tensor(), grad_gamma = n.gamma ? out[1] : at::Tensor(),
             grad_beta = n.beta ? out[2] : at::Tensor();
  if (n.gamma && n.gamma_dim == 1) {
    grad_gamma = grad_gamma.sum(0);
    if (add_gamma.defined()) grad_gamma = grad_gamma.add(add_gamma);
  }
  if (n.beta && n.beta_dim == 1) grad_beta = grad_beta.sum(0);
  return {grad_x, grad_gamma, grad_beta};
}

struct TaskBatchNormBackwardNode : public torch::autograd::Function<TaskBatchNormBackwardNode> {
  // [grad_x, grad_gamma, grad_beta] = task_batch_norm_backward(grad_z, x, gamma, ...).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_z, const at::Tensor& x,
                               const c10::optional<at::Tensor>& gamma, double eps, bool need_x, bool need_gamma,
                               bool need_beta, const c10::optional<at::Tensor>& y, std::string act,
                               double negative_slope, const c10::optional<at::Tensor>& dx_addend,
                               const c10::optional<at::Tensor>& dgamma_addend) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_z, x, gamma.value_or(at::Tensor()), y.value_or(at::Tensor())});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["needs"] = std::vector<bool>{need_x, need_gamma, need_beta};
    ctx->saved_data["act"] = act;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["edges"] = edge_indices({true, true, gamma.has_value(), y.has_value(), dx_addend.has_value(),
                                             dgamma_addend.has_value()});
    return recorded("fastmeta::task_batch_norm_backward", "fastmeta_ext::task_batch_norm_backward", [&] {
      return task_batch_norm_backward(grad_z.contiguous(), x.contiguous(), gamma, eps,
                                      bool_list({need_x, need_gamma, need_beta}), contiguous(y), act, negative_slope,
                                      contiguous(dx_addend), contiguous(dgamma_addend));
    });
  }

  // No gradient at y: f'(y) is piecewise constant. The addends' gradients are the upstream
  // of grad_x / grad_γ, unchanged.
  static variable_list backward(AutogradContext* ctx, variable_list upstreams) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_z = saved[0], &x = saved[1], &gamma = saved[2], &y = saved[3];
    const BnBackwardUpstream u = bn_backward_upstream(ctx, upstreams, gamma.defined(), 4);
    const at::Tensor &up_x = u.up_x, &up_gamma = u.up_gamma, &up_beta = u.up_beta;
    const bool m0 = u.d_grad, m1 = u.d_x, m2 = u.d_gamma;
    const at::Tensor none;
    at::Tensor d_grad_z, d_x, d_gamma;
    if (m0 || m1 || m2) {
      const double eps = ctx->saved_data["eps"].toDouble();
      const std::string act = ctx->saved_data["act"].toStringRef();
      const double slope = ctx->saved_data["negative_slope"].toDouble();
      const c10::List<bool> mask = bool_list({m0, m1, m2});
      std::vector<at::Tensor> out;
      if (at::GradMode::is_enabled()) {  // third order: the public op, with torch.library's autograd
        static const c10::OperatorHandle op =
            c10::Dispatcher::singleton().findSchemaOrThrow("fastmeta::task_batch_norm_double_backward", "");
        const torch::jit::Stack result = call_public_op(
            op, {grad_z, x, maybe(gamma), maybe(up_x), maybe(up_gamma), maybe(up_beta), eps, mask, maybe(y), act,
                 slope});
        out = result[0].toTensorVector();  // the op returns Tensor[]
      } else {
        out = recorded("fastmeta::task_batch_norm_double_backward", "fastmeta_ext::task_batch_norm_double_backward",
                       [&] {
                         return task_batch_norm_double_backward(grad_z.contiguous(), x.contiguous(), maybe(gamma),
                                                                contiguous(up_x), maybe(up_gamma), maybe(up_beta), eps,
                                                                mask, contiguous(y), act, slope);
                       });
      }
      if (m0) d_grad_z = out[0];
      if (m1) d_x = out[1];
      if (m2) d_gamma = gamma.dim() == 1 ? out[2].sum(0) : out[2];
    }
    // One per forward argument: grad_z, x, gamma, eps, the three needs, y, act, slope, the addends.
    return {d_grad_z, d_x, d_gamma, none, none, none, none, none, none, none, u.d_x_addend, u.d_gamma_addend};
  }
};

struct TaskBatchNormNode : public torch::autograd::Function<TaskBatchNormNode> {
  // y = task_batch_norm(x, gamma, beta, ...), and an alias of x and of γ where asked
  // (outputs_with_aliases).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                               const c10::optional<at::Tensor>& beta, double eps, std::string act,
                               double negative_slope, bool alias_x, bool alias_gamma) {
    ctx->set_materialize_grads(false);
    at::Tensor y = recorded(nullptr, "fastmeta_ext::task_batch_norm",
                            [&] { return task_batch_norm(x, gamma, beta, eps, act, negative_slope); });
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["gamma_dim"] = gamma.has_value() ? gamma->dim() : int64_t(0);
    ctx->saved_data["beta_dim"] = beta.has_value() ? beta->dim() : int64_t(0);
    ctx->saved_data["edges"] = edge_indices({true, gamma.has_value(), beta.has_value()});
    const at::Tensor saved_y = act != "none" ? y : at::Tensor();  // f'(y) for the mask activations
    return outputs_with_aliases(ctx, std::move(y), x, gamma.value_or(at::Tensor()), alias_x, alias_gamma, saved_y);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    const at::Tensor grad_y = grads[0];
    const auto [add_x, add_gamma] = alias_grads(ctx, grads);
    const BnLayerNeeds n = bn_layer_needs(ctx);
    const int64_t gamma_dim = n.gamma_dim;
    const bool need_x = n.x, need_gamma = n.gamma, need_beta = n.beta;
    // One per forward argument: x, gamma, beta, eps, act, negative_slope, the two alias flags.
    if (!grad_y.defined())  // only the aliases were read
      return {need_x ? add_x : none, need_gamma ? add_gamma : none, none, none, none, none, none, none};
    if (!n.any()) return {none, none, none, none, none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &gamma = saved[1], &y = saved[2];
    const double eps = ctx->saved_data["eps"].toDouble();
    const std::string act = ctx->saved_data["act"].toStringRef();
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    const at::Tensor kernel_gamma_addend = gamma_dim == 2 && need_gamma ? add_gamma : none;
    const at::Tensor kernel_x_addend = need_x ? add_x : none;
    variable_list out;
    if (at::GradMode::is_enabled()) {
      out = TaskBatchNormBackwardNode::apply(grad_y, x, maybe(gamma), eps, need_x, need_gamma, need_beta, maybe(y), act,
                                             slope, maybe(kernel_x_addend), maybe(kernel_gamma_addend));
    } else {
      out = recorded("fastmeta::task_batch_norm_backward", "fastmeta_ext::task_batch_norm_backward", [&] {
        return task_batch_norm_backward(grad_y.contiguous(), x.contiguous(), maybe(gamma), eps,
                                        bool_list({need_x, need_gamma, need_beta}), contiguous(y), act, slope,
                                        contiguous(kernel_x_addend), contiguous(kernel_gamma_addend));
      });
    }
    const auto layer = bn_layer_grads(out, n, add_gamma);
    return {layer[0], layer[1], layer[2], none, none, none, none, none};
  }
};

std::vector<at::Tensor> task_batch_norm_node(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                                             const c10::optional<at::Tensor>& beta, double eps, c10::string_view act,
                                             double negative_slope, bool alias_x, bool alias_gamma) {
  return TaskBatchNormNode::apply(x, gamma, beta, eps, std::string(act.data(), act.size()), negative_slope, alias_x,
                                  alias_gamma);
}

// The public task_batch_norm_backward's entry to its node (see task_conv2d_backward_node in
// task_conv2d.cpp), for "none" and the mask activations.
std::vector<at::Tensor> task_batch_norm_backward_node(const at::Tensor& grad_z, const at::Tensor& x,
                                                      const c10::optional<at::Tensor>& gamma, double eps,
                                                      c10::List<bool> needs, const c10::optional<at::Tensor>& y,
                                                      c10::string_view act, double negative_slope,
                                                      const c10::optional<at::Tensor>& dx_addend,
                                                      const c10::optional<at::Tensor>& dgamma_addend) {
  TORCH_CHECK_VALUE(needs.size() == 3, "task_batch_norm_backward: needs holds three flags (x, gamma, beta), got ",
                    needs.size());
  return TaskBatchNormBackwardNode::apply(grad_z, x, gamma, eps, needs.get(0), needs.get(1), needs.get(2), y,
                                          std::string(act.data(), act.size()), negative_slope, dx_addend,
                                          dgamma_addend);
}

// ---------------------------------------------------------------------------------------
// task_batch_norm_max_pool2d and its backward op: the same pair of nodes for the fused
// BatchNorm → activation → max-pooling block, what fastmeta/ops/task_batch_norm_max_pool2d.py's
// Python nodes do (the alias outputs and addends, the task sums of shared γ and β, no
// gradient at the pooled values or the indices). The public ops take them where that
// file's `_block_native_node` and `_block_backward_native_node` say.
// ---------------------------------------------------------------------------------------

struct TaskBatchNormMaxPoolBackwardNode : public torch::autograd::Function<TaskBatchNormMaxPoolBackwardNode> {
  // [grad_x, grad_gamma, grad_beta] = task_batch_norm_max_pool2d_backward(grad_pooled, x, gamma, pooled, ...).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_pooled, const at::Tensor& x,
                               const c10::optional<at::Tensor>& gamma, const at::Tensor& pooled,
                               const at::Tensor& indices, double eps, bool need_x, bool need_gamma, bool need_beta,
                               std::string act, double negative_slope, int64_t kernel_size,
                               const c10::optional<at::Tensor>& dx_addend,
                               const c10::optional<at::Tensor>& dgamma_addend) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_pooled, x, gamma.value_or(at::Tensor()), pooled, indices});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["needs"] = std::vector<bool>{need_x, need_gamma, need_beta};
    ctx->saved_data["act"] = act;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["edges"] = edge_indices(
        {true, true, gamma.has_value(), true, true, dx_addend.has_value(), dgamma_addend.has_value()});
    return recorded("fastmeta::task_batch_norm_max_pool2d_backward",
                    "fastmeta_ext::task_batch_norm_max_pool2d_backward", [&] {
                      return task_batch_norm_max_pool2d_backward(
                          grad_pooled.contiguous(), x.contiguous(), gamma, pooled.contiguous(), indices.contiguous(),
                          eps, bool_list({need_x, need_gamma, need_beta}), act, negative_slope, kernel_size,
                          contiguous(dx_addend), contiguous(dgamma_addend));
                    });
  }

  // No gradient at the pooled values or the indices. The addends' gradients are the
  // upstream of grad_x / grad_γ, unchanged.
  static variable_list backward(AutogradContext* ctx, variable_list upstreams) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_pooled = saved[0], &x = saved[1], &gamma = saved[2], &pooled = saved[3],
                     &indices = saved[4];
    const BnBackwardUpstream u = bn_backward_upstream(ctx, upstreams, gamma.defined(), 5);
    const at::Tensor &up_x = u.up_x, &up_gamma = u.up_gamma, &up_beta = u.up_beta;
    const bool m0 = u.d_grad, m1 = u.d_x, m2 = u.d_gamma;
    const at::Tensor none;
    at::Tensor d_grad_pooled, d_x, d_gamma;
    if (m0 || m1 || m2) {
      const double eps = ctx->saved_data["eps"].toDouble();
      const std::string act = ctx->saved_data["act"].toStringRef();
      const double slope = ctx->saved_data["negative_slope"].toDouble();
      const int64_t kernel_size = ctx->saved_data["kernel_size"].toInt();
      const c10::List<bool> mask = bool_list({m0, m1, m2});
      std::vector<at::Tensor> out;
      if (at::GradMode::is_enabled()) {  // third order: the public op, with torch.library's autograd
        static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow(
            "fastmeta::task_batch_norm_max_pool2d_double_backward", "");
        out = call_public_op(op, {grad_pooled, x, maybe(gamma), pooled, indices, maybe(up_x), maybe(up_gamma),
                                  maybe(up_beta), eps, mask, act, slope, kernel_size})[0]
                  .toTensorVector();
      } else {
        out = recorded("fastmeta::task_batch_norm_max_pool2d_double_backward",
                       "fastmeta_ext::task_batch_norm_max_pool2d_double_backward", [&] {
                         return task_batch_norm_max_pool2d_double_backward(
                             grad_pooled.contiguous(), x.contiguous(), maybe(gamma), pooled.contiguous(),
                             indices.contiguous(), contiguous(up_x), maybe(up_gamma), maybe(up_beta), eps, mask, act,
                             slope, kernel_size);
                       });
      }
      if (m0) d_grad_pooled = out[0];
      if (m1) d_x = out[1];
      if (m2) d_gamma = gamma.dim() == 1 ? out[2].sum(0) : out[2];
    }
    // One per forward argument: grad_pooled, x, gamma, pooled, indices, eps, the three needs,
    // act, slope, kernel_size, the addends.
    return {d_grad_pooled, d_x, d_gamma, none, none, none, none, none, none, none, none, none, u.d_x_addend,
            u.d_gamma_addend};
  }
};

struct TaskBatchNormMaxPoolNode : public torch::autograd::Function<TaskBatchNormMaxPoolNode> {
  // [pooled, indices] = task_batch_norm_max_pool2d(x, gamma, beta, ...), then an alias of x
  // and of γ where asked (as outputs_with_aliases, after the two outputs); the indices are
  // not differentiable.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                               const c10::optional<at::Tensor>& beta, double eps, std::string act,
                               double negative_slope, int64_t kernel_size, bool alias_x, bool alias_gamma) {
    ctx->set_materialize_grads(false);
    std::vector<at::Tensor> out = recorded(nullptr, "fastmeta_ext::task_batch_norm_max_pool2d", [&] {
      return task_batch_norm_max_pool2d(x.contiguous(), gamma, beta, eps, act, negative_slope, kernel_size);
    });
    ctx->mark_non_differentiable({out[1]});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = act;
    ctx->saved_data["negative_slope"] = negative_slope;
    ctx->saved_data["kernel_size"] = kernel_size;
    ctx->saved_data["gamma_dim"] = gamma.has_value() ? gamma->dim() : int64_t(0);
    ctx->saved_data["beta_dim"] = beta.has_value() ? beta->dim() : int64_t(0);
    ctx->saved_data["edges"] = edge_indices({true, gamma.has_value(), beta.has_value()});
    ctx->saved_data["alias_x"] = alias_x;
    ctx->saved_data["alias_gamma"] = alias_gamma;
    variable_list outputs{out[0], out[1]};
    at::Tensor x_read = x, gamma_read = gamma.value_or(at::Tensor());
    if (alias_x) outputs.push_back(x_read = x.view_as(x));
    if (alias_gamma) outputs.push_back(gamma_read = gamma_read.view_as(gamma_read));
    ctx->save_for_backward({x_read, gamma_read, out[0], out[1]});
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    const at::Tensor grad_pooled = grads[0];
    const bool alias_x = ctx->saved_data["alias_x"].toBool(), alias_gamma = ctx->saved_data["alias_gamma"].toBool();
    const at::Tensor add_x = alias_x ? grads[2] : none, add_gamma = alias_gamma ? grads[alias_x ? 3 : 2] : none;
    const BnLayerNeeds n = bn_layer_needs(ctx);
    const int64_t gamma_dim = n.gamma_dim;
    const bool need_x = n.x, need_gamma = n.gamma, need_beta = n.beta;
    // One per forward argument: x, gamma, beta, eps, act, negative_slope, kernel_size, the two alias flags.
    if (!grad_pooled.defined())  // only the aliases were read
      return {need_x ? add_x : none, need_gamma ? add_gamma : none, none, none, none, none, none, none, none};
    if (!n.any()) return {none, none, none, none, none, none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &gamma = saved[1], &pooled = saved[2], &indices = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const std::string act = ctx->saved_data["act"].toStringRef();
    const double slope = ctx->saved_data["negative_slope"].toDouble();
    const int64_t kernel_size = ctx->saved_data["kernel_size"].toInt();
    const at::Tensor kernel_gamma_addend = gamma_dim == 2 && need_gamma ? add_gamma : none;
    const at::Tensor kernel_x_addend = need_x ? add_x : none;
    variable_list out;
    if (at::GradMode::is_enabled()) {
      out = TaskBatchNormMaxPoolBackwardNode::apply(grad_pooled, x, maybe(gamma), pooled, indices, eps, need_x,
                                                    need_gamma, need_beta, act, slope, kernel_size,
                                                    maybe(kernel_x_addend), maybe(kernel_gamma_addend));
    } else {
      out = recorded("fastmeta::task_batch_norm_max_pool2d_backward",
                     "fastmeta_ext::task_batch_norm_max_pool2d_backward", [&] {
                       return task_batch_norm_max_pool2d_backward(
                           grad_pooled.contiguous(), x.contiguous(), maybe(gamma), pooled.contiguous(),
                           indices.contiguous(), eps, bool_list({need_x, need_gamma, need_beta}), act, slope,
                           kernel_size, contiguous(kernel_x_addend), contiguous(kernel_gamma_addend));
                     });
    }
    const auto layer = bn_layer_grads(out, n, add_gamma);
    return {layer[0], layer[1], layer[2], none, none, none, none, none, none};
  }
};

std::vector<at::Tensor> task_batch_norm_max_pool2d_node(const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
                                                        const c10::optional<at::Tensor>& beta, double eps,
                                                        c10::string_view act, double negative_slope,
                                                        int64_t kernel_size, bool alias_x, bool alias_gamma) {
  return TaskBatchNormMaxPoolNode::apply(x, gamma, beta, eps, std::string(act.data(), act.size()), negative_slope,
                                         kernel_size, alias_x, alias_gamma);
}

std::vector<at::Tensor> task_batch_norm_max_pool2d_backward_node(
    const at::Tensor& grad_pooled, const at::Tensor& x, const c10::optional<at::Tensor>& gamma,
    const at::Tensor& pooled, const at::Tensor& indices, double eps, c10::List<bool> needs, c10::string_view act,
    double negative_slope, int64_t kernel_size, const c10::optional<at::Tensor>& dx_addend,
    const c10::optional<at::Tensor>& dgamma_addend) {
  TORCH_CHECK_VALUE(needs.size() == 3,
                    "task_batch_norm_max_pool2d_backward: needs holds three flags (x, gamma, beta), got ",
                    needs.size());
  return TaskBatchNormMaxPoolBackwardNode::apply(grad_pooled, x, gamma, pooled, indices, eps, needs.get(0),
                                                 needs.get(1), needs.get(2), std::string(act.data(), act.size()),
                                                 negative_slope, kernel_size, dx_addend, dgamma_addend);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("task_batch_norm", &fastmeta::cpu::task_batch_norm);
  m.impl("task_batch_norm_backward", &fastmeta::cpu::task_batch_norm_backward);
  m.impl("task_batch_norm_double_backward", &fastmeta::cpu::task_batch_norm_double_backward);
  m.impl("task_batch_norm_max_pool2d", &fastmeta::cpu::task_batch_norm_max_pool2d);
  m.impl("task_batch_norm_max_pool2d_backward", &fastmeta::cpu::task_batch_norm_max_pool2d_backward);
  m.impl("task_batch_norm_max_pool2d_double_backward", &fastmeta::cpu::task_batch_norm_max_pool2d_double_backward);
}

// The eager node's entry (see task_conv2d_node in task_conv2d.cpp).
TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("task_batch_norm_node(Tensor x, Tensor? gamma, Tensor? beta, float eps, str act, float negative_slope, "
        "bool alias_x, bool alias_gamma) -> Tensor[]");
  m.def("task_batch_norm_backward_node(Tensor grad_z, Tensor x, Tensor? gamma, float eps, bool[] needs, Tensor? y, "
        "str act, float negative_slope, Tensor? dx_addend, Tensor? dgamma_addend) -> Tensor[]");
  m.def("task_batch_norm_max_pool2d_node(Tensor x, Tensor? gamma, Tensor? beta, float eps, str act, "
        "float negative_slope, int kernel_size, bool alias_x, bool alias_gamma) -> Tensor[]");
  m.def("task_batch_norm_max_pool2d_backward_node(Tensor grad_pooled, Tensor x, Tensor? gamma, Tensor pooled, "
        "Tensor indices, float eps, bool[] needs, str act, float negative_slope, int kernel_size, Tensor? dx_addend, "
        "Tensor? dgamma_addend) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("task_batch_norm_node", &fastmeta::cpu::task_batch_norm_node);
  m.impl("task_batch_norm_backward_node", &fastmeta::cpu::task_batch_norm_backward_node);
  m.impl("task_batch_norm_max_pool2d_node", &fastmeta::cpu::task_batch_norm_max_pool2d_node);
  m.impl("task_batch_norm_max_pool2d_backward_node", &fastmeta::cpu::task_batch_norm_max_pool2d_backward_node);
}
