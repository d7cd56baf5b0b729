// CPU kernels of the task_linear family: y = act(x·wᵀ + b) per task, its input- and
// weight-gradients (apart and as one op), and their double backward. Two GEMM routes, chosen per call by the multiply-adds of one task's
// GEMM (blas.h, use_blas):
// - above the tiny-matrix size, BLAS (no dispatch): MKL's batch call for per-task weights
//   (else one sgemm_/dgemm_ per task, tasks spread over the OpenMP threads), one GEMM for
//   all tasks where the weight is shared; the bias and activation follow on each task's rows;
// - below it, the register-tiled micro-kernel (gemm.h) on (task, block of 48 rows) pairs,
//   the bias and activation applied while the rows are still in L1.
// Bound: FLOPs for the layer sizes fastmeta runs, memory only when O or I is tiny.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common.h"
#include "activation.h"
#include "cpu_common.h"
#include "eager_nodes.h"
#include "blas.h"
#include "gemm.h"

namespace fastmeta {
namespace cpu {
namespace {


// Rows per work item: a multiple of the micro-kernel's 6 rows, and small enough that W2's
// 32 tasks × 80 rows give both threads several items each.
constexpr int64_t kRowBlock = 48;

// A per-task [T, O, I] weight (or [T, O] bias) may have any task stride (a view of the flat
// fast-weight buffer: no layout copy) as long as each task's block is contiguous; the
// kernels read it at task_stride. A shared one is contiguous.
bool task_blocks_contiguous(const at::Tensor& t) {
  for (int64_t d = t.dim() - 1, expected = 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

int64_t task_stride(const at::Tensor& t) {
  return t.size(0) > 1 ? t.stride(0) : t.numel();
}

void check_weight(const at::Tensor& w, const at::Tensor& x, int64_t T, const char* name) {
  FM_CHECK_DEVICE(w, kCPU);
  FM_CHECK_SAME_DTYPE(w, x);
  TORCH_CHECK_VALUE(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), name, " must be [T, O, I] with T = ", T,
              " or [O, I], got ", w.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 ? w.is_contiguous() : task_blocks_contiguous(w), name,
              " must be contiguous within each task, got strides ", w.strides());
}

void check_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  FM_CHECK_DIM(x, 3);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2);
  check_weight(w, x, T, "w");
  const bool w_shared = w.dim() == 2;
  const int64_t O = w.size(-2);
  TORCH_CHECK_VALUE(w.size(-1) == I, "w must have ", I, " input features, got ", w.sizes());
  bool b_shared = true;
  if (b.has_value()) {
    FM_CHECK_DEVICE(*b, kCPU);
    FM_CHECK_SAME_DTYPE(*b, x);
    b_shared = b->dim() == 1;
    TORCH_CHECK_VALUE((b_shared && b->size(0) == O) || (b->dim() == 2 && b->size(0) == T && b->size(1) == O),
                "b must be [O] or [T, O] with O = ", O, ", T = ", T, ", got ", b->sizes());
    TORCH_CHECK_VALUE(b_shared ? b->is_contiguous() : task_blocks_contiguous(*b),
                "b must be contiguous within each task, got strides ", b->strides());
  }
}

// y = act(x·wᵀ + b) into y ([T, N, O], contiguous), or y += x·wᵀ where accumulate (no
// bias, no activation: the double backward's d grad_out, two products summed in place).
void linear_into(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b, Act act,
                 double negative_slope, at::Tensor& y, bool accumulate) {
  TORCH_INTERNAL_ASSERT(!accumulate || (!b.has_value() && act == Act::None));
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2);
  const bool w_shared = w.dim() == 2;
  const int64_t O = w.size(-2);
  const bool b_shared = !b.has_value() || b->dim() == 1;
  const int64_t ws = w_shared ? 0 : task_stride(w);
  const int64_t bs = b.has_value() && !b_shared ? task_stride(*b) : 0;
  if (y.numel() == 0) return;
  dispatch_floating(x.scalar_type(), "task_linear", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using T_ = scalar_t;
    const T_* wp = w.data_ptr<T_>();
    const T_* xp = x.data_ptr<T_>();
    const T_* bp = b.has_value() ? b->data_ptr<T_>() : nullptr;
    T_* yp = y.data_ptr<T_>();
    const T_ slope = static_cast<T_>(negative_slope);
    // Bias and activation on rows [n0, n0 + rows) of task t.
    auto epilogue = [&](int64_t t, int64_t n0, int64_t rows) {
      const T_* bt = bp ? bp + t * bs : nullptr;
      if (!bt && act == Act::None) return;
      for (int64_t r = 0; r < rows; ++r) {
        T_* row = yp + (t * N + n0 + r) * O;
        if (bt) {
#pragma omp simd
          for (int64_t o = 0; o < O; ++o) row[o] += bt[o];
        }
        if (act != Act::None)
          for (int64_t o = 0; o < O; ++o) row[o] = act_forward<T_>(row[o], act, slope);
      }
    };
    // Row-major y[t] = x[t]·w[t]ᵀ is column-major y[t]ᵀ (O×N) = w[t]ᵀ'·x[t]ᵀ: ('T', 'N').
    if (w_shared && use_blas<T_>(O, T * N, I, kBlasMinMacsForward)) {
      blas_gemm<T_>('T', 'N', O, T * N, I, wp, I, xp, I, yp, O, accumulate);
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) epilogue(t, 0, N);
      });
      return;
    }
    if (!w_shared && use_blas<T_>(O, N, I, kBlasMinMacsForward)) {
      blas_gemm_batched<T_>('T', 'N', T, O, N, I, wp, ws, I, xp, N * I, I, yp, N * O, O, accumulate);
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) epilogue(t, 0, N);
      });
      return;
    }
    const int64_t Tw = w_shared ? 1 : T;
    // wᵀ once per task ([I, O] rows), so that the micro-kernel streams contiguous rows of B.
    std::vector<T_> wt(Tw * I * O);
    at::parallel_for(0, Tw, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t o = 0; o < O; ++o)
          for (int64_t i = 0; i < I; ++i) wt[(t * I + i) * O + o] = wp[t * ws + o * I + i];
    });
    const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, T * blocks, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / blocks, n0 = (j % blocks) * kRowBlock;
        const int64_t rows = std::min(kRowBlock, N - n0);
        gemm<T_>(rows, O, I, xp + (t * N + n0) * I, I, 1, wt.data() + (w_shared ? 0 : t * I * O), O,
                 yp + (t * N + n0) * O, O, accumulate);
        epilogue(t, n0, rows);
      }
    });
  });
}

at::Tensor task_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       c10::string_view act_name, double negative_slope) {
  check_linear(x, w, b);
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  at::Tensor y = at::empty({x.size(0), x.size(1), w.size(-2)}, x.options());
  linear_into(x, w, b, act, negative_slope, y, false);
  return y;
}

// The gradients below, each plus `addend` (the output's shape, contiguous) when given: the
// output starts as the addend and every GEMM accumulates into it (beta = 1).
at::Tensor input_grad_plus(const at::Tensor& grad_out, const at::Tensor& w, const at::Tensor* addend) {
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_FLOATING(grad_out);
  FM_CHECK_DIM(grad_out, 3);
  const int64_t T = grad_out.size(0), N = grad_out.size(1), O = grad_out.size(2);
  check_weight(w, grad_out, T, "w");
  TORCH_CHECK_VALUE(w.size(-2) == O, "w must have ", O, " output features, got ", w.sizes());
  const bool w_shared = w.dim() == 2;
  const int64_t I = w.size(-1);
  const int64_t ws = w_shared ? 0 : task_stride(w);
  at::Tensor out = at::empty({T, N, I}, grad_out.options());
  if (out.numel() == 0) return out;
  const bool acc = addend != nullptr;
  if (O == 0) return acc ? out.copy_(*addend) : out.zero_();
  dispatch_floating(grad_out.scalar_type(), "task_linear_input_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (acc) std::copy(addend->data_ptr<scalar_t>(), addend->data_ptr<scalar_t>() + out.numel(), o);
    // Row-major out[t] = g[t]·w[t] is column-major out[t]ᵀ (I×N) = w[t]ᵀ·g[t]ᵀ: ('N', 'N').
    if (w_shared && use_blas<scalar_t>(I, T * N, O)) {
      blas_gemm<scalar_t>('N', 'N', I, T * N, O, wp, I, g, O, o, I, acc);
      return;
    }
    if (!w_shared && use_blas<scalar_t>(I, N, O)) {
      blas_gemm_batched<scalar_t>('N', 'N', T, I, N, O, wp, ws, I, g, N * O, O, o, N * I, I, acc);
      return;
    }
    const int64_t blocks = (N + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, T * blocks, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t t = j / blocks, n0 = (j % blocks) * kRowBlock;
        const int64_t rows = std::min(kRowBlock, N - n0);
        gemm<scalar_t>(rows, I, O, g + (t * N + n0) * O, O, 1, wp + t * ws, I,
                       o + (t * N + n0) * I, I, acc);
      }
    });
  });
  return out;
}

at::Tensor weight_grad_plus(const at::Tensor& grad_out, const at::Tensor& x, bool shared, const at::Tensor* addend) {
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  FM_CHECK_SAME_DTYPE(grad_out, x);
  FM_CHECK_DIM(grad_out, 3);
  FM_CHECK_DIM(x, 3);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2), O = grad_out.size(2);
  TORCH_CHECK_VALUE(grad_out.size(0) == T && grad_out.size(1) == N, "grad_out must be [", T, ", ", N,
              ", O], got ", grad_out.sizes());
  at::Tensor out = shared ? at::empty({O, I}, x.options()) : at::empty({T, O, I}, x.options());
  if (out.numel() == 0) return out;
  const bool acc = addend != nullptr;
  if (N == 0 || T == 0) return acc ? out.copy_(*addend) : out.zero_();
  dispatch_floating(x.scalar_type(), "task_linear_weight_grad", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    if (acc) std::copy(addend->data_ptr<scalar_t>(), addend->data_ptr<scalar_t>() + out.numel(), o);
    // Row-major out[t] = g[t]ᵀ·x[t] is column-major out[t]ᵀ (I×O) = x[t]ᵀ·g[t]: ('N', 'T').
    if (shared && use_blas<scalar_t>(I, O, T * N)) {
      blas_gemm<scalar_t>('N', 'T', I, O, T * N, xp, I, g, O, o, I, acc);
      return;
    }
    if (!shared && use_blas<scalar_t>(I, O, N)) {
      blas_gemm_batched<scalar_t>('N', 'T', T, I, O, N, xp, N * I, I, g, N * O, O, o, O * I, I, acc);
      return;
    }
    // The micro-kernel reads grad_outᵀ in place through the strides (row o of Aᵀ is column o
    // of grad_out).
    if (shared) {
      // One GEMM with the task and example dims merged (K = T·N), split over blocks of O.
      const int64_t blocks = (O + kRowBlock - 1) / kRowBlock;
      at::parallel_for(0, blocks, 1, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t o0 = j * kRowBlock, rows = std::min(kRowBlock, O - o0);
          gemm<scalar_t>(rows, I, T * N, g + o0, 1, O, xp, I, o + o0 * I, I, acc);
        }
      });
    } else {
      at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t)
          gemm<scalar_t>(O, I, N, g + t * N * O, 1, O, xp + t * N * I, I, o + t * O * I, I, acc);
      });
    }
  });
  return out;
}

at::Tensor task_linear_input_grad(const at::Tensor& grad_out, const at::Tensor& w) {
  return input_grad_plus(grad_out, w, nullptr);
}

at::Tensor task_linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, bool shared) {
  return weight_grad_plus(grad_out, x, shared, nullptr);
}

bool mask_at(const c10::List<bool>& mask, size_t i) { return mask.size() > i && mask.get(i); }

// The bias's gradient: grad_out [T, N, O] summed over the examples → [T, O], and over the
// tasks too where the bias is shared → [O]. Rows added into the output row (vectorised over
// O), tasks split over the threads; the shared sum in one pass over the T·N rows.
at::Tensor bias_grad(const at::Tensor& grad_out, bool shared) {
  const int64_t T = grad_out.size(0), N = grad_out.size(1), O = grad_out.size(2);
  at::Tensor out = shared ? at::empty({O}, grad_out.options()) : at::empty({T, O}, grad_out.options());
  if (out.numel() == 0) return out;
  dispatch_floating(grad_out.scalar_type(), "task_linear_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    std::fill(o, o + out.numel(), scalar_t(0));  // in the kernel: no aten::zeros dispatch
    const auto sum_rows = [&](const scalar_t* rows, int64_t count, scalar_t* into) {
      for (int64_t n = 0; n < count; ++n) {
        const scalar_t* row = rows + n * O;
        for (int64_t k = 0; k < O; ++k) into[k] += row[k];
      }
    };
    if (shared) {
      sum_rows(g, T * N, o);
      return;
    }
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) sum_rows(g + t * N * O, N, o + t * O);
    });
  });
  return out;
}

// d grad_out += g_db broadcast over the examples (and the tasks for a 1-D g_db): the bias
// sum's VJP, added in place of an aten add of its own; written where no GEMM wrote first.
// g_db is read at its task stride (a view of the flat gradient buffer: no copy); its rows
// are contiguous.
void add_bias_gradient(at::Tensor& d_grad_out, const at::Tensor& g_db, bool written) {
  const int64_t T = d_grad_out.size(0), N = d_grad_out.size(1), O = d_grad_out.size(2);
  dispatch_floating(d_grad_out.scalar_type(), "task_linear_double_backward", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* b = g_db.data_ptr<scalar_t>();
    scalar_t* d = d_grad_out.data_ptr<scalar_t>();
    const int64_t bias_task_stride = g_db.dim() == 2 ? g_db.stride(0) : 0;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t n = 0; n < N; ++n) {
          scalar_t* row = d + (t * N + n) * O;
          const scalar_t* bias = b + t * bias_task_stride;
          if (written)
            for (int64_t k = 0; k < O; ++k) row[k] += bias[k];
          else
            for (int64_t k = 0; k < O; ++k) row[k] = bias[k];
        }
    });
  });
}

// (grad_out·w, grad_outᵀ·x): task_linear's input and weight gradients in one op; an output
// the mask leaves out is empty (numel 0) and not computed. A 2-D w is shared: its gradient
// is summed over tasks.
// dx_addend / dw_addend, when given, are added to dx / dw by the GEMMs (beta = 1 on an
// output that starts as the addend): task_linear's eager node passes the gradients its alias
// outputs of x and w received, which autograd's engine would otherwise sum with x's and w's
// gradients by an aten add each.
// The mask's third entry asks for the bias's gradient (bias_grad above: [O] where
// bias_shared, else [T, O]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> task_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& w,
                                                                    const c10::List<bool>& output_mask,
                                                                    const c10::optional<at::Tensor>& dx_addend,
                                                                    const c10::optional<at::Tensor>& dw_addend,
                                                                    bool bias_shared) {
  const bool want_x = mask_at(output_mask, 0), want_w = mask_at(output_mask, 1), want_b = mask_at(output_mask, 2);
  TORCH_CHECK_VALUE(output_mask.size() == 2 || output_mask.size() == 3,
                    "output_mask must have 2 or 3 entries (dx, dw[, db]), got ", output_mask.size());
  if (dx_addend.has_value()) {
    FM_CHECK_INPUT(*dx_addend, kCPU);
    FM_CHECK_SAME_DTYPE(*dx_addend, grad_out);
    TORCH_CHECK_VALUE(want_x && dx_addend->dim() == 3 && dx_addend->size(0) == grad_out.size(0) &&
                          dx_addend->size(1) == grad_out.size(1) && dx_addend->size(2) == w.size(-1),
                      "dx_addend must be [T, N, I] and dx wanted, got ", dx_addend->sizes());
  }
  if (dw_addend.has_value()) {
    FM_CHECK_INPUT(*dw_addend, kCPU);
    FM_CHECK_SAME_DTYPE(*dw_addend, grad_out);
    TORCH_CHECK_VALUE(want_w && dw_addend->sizes() == w.sizes(), "dw_addend must have w's shape ", w.sizes(),
                      " and dw wanted, got ", dw_addend->sizes());
  }
  at::Tensor d_x = want_x ? input_grad_plus(grad_out, w, dx_addend.has_value() ? &*dx_addend : nullptr)
                          : at::empty({0}, grad_out.options());
  at::Tensor d_w = want_w ? weight_grad_plus(grad_out, x, w.dim() == 2, dw_addend.has_value() ? &*dw_addend : nullptr)
                          : at::empty({0}, grad_out.options());
  at::Tensor d_b = want_b ? bias_grad(grad_out.contiguous(), bias_shared) : at::empty({0}, grad_out.options());
  return {d_x, d_w, d_b};
}

// task_linear_backward's VJP for upstreams g_dx, g_dw and g_db (any absent): d_grad_out =
// g_dx·w + x·g_dwᵀ + g_db (the second GEMM accumulates into the first's output, g_db is added
// broadcast over the examples), d_x = grad_out·g_dw, d_w = grad_outᵀ·g_dx (summed over tasks
// for a 2-D w). A term without its upstream is zero.
std::tuple<at::Tensor, at::Tensor, at::Tensor> task_linear_double_backward(
    const c10::optional<at::Tensor>& g_dx, const c10::optional<at::Tensor>& g_dw, const at::Tensor& grad_out,
    const at::Tensor& x, const at::Tensor& w, const c10::List<bool>& output_mask,
    const c10::optional<at::Tensor>& g_db) {
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_DIM(grad_out, 3);
  check_linear(x, w, c10::nullopt);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) && grad_out.size(2) == w.size(-2),
                    "grad_out must be [", x.size(0), ", ", x.size(1), ", ", w.size(-2), "], got ", grad_out.sizes());
  const auto empty = [&] { return at::empty({0}, grad_out.options()); };
  at::Tensor d_grad_out = empty(), d_x = empty(), d_w = empty();
  if (mask_at(output_mask, 0)) {
    d_grad_out = at::empty(grad_out.sizes(), grad_out.options());
    if (g_dx.has_value()) {
      check_linear(*g_dx, w, c10::nullopt);
      TORCH_CHECK_VALUE(g_dx->sizes() == x.sizes(), "g_dx must be ", x.sizes(), ", got ", g_dx->sizes());
      linear_into(*g_dx, w, c10::nullopt, Act::None, 0.0, d_grad_out, false);
    }
    if (g_dw.has_value()) {
      check_linear(x, *g_dw, c10::nullopt);
      TORCH_CHECK_VALUE(g_dw->dim() == w.dim() && g_dw->size(-2) == w.size(-2), "g_dw must be shaped as w ",
                        w.sizes(), ", got ", g_dw->sizes());
      linear_into(x, *g_dw, c10::nullopt, Act::None, 0.0, d_grad_out, g_dx.has_value());
    }
    const bool written = g_dx.has_value() || g_dw.has_value();
    if (g_db.has_value()) {
      FM_CHECK_DEVICE(*g_db, kCPU);  // read at its task stride (add_bias_gradient)
      FM_CHECK_SAME_DTYPE(*g_db, grad_out);
      const int64_t O = grad_out.size(2);
      TORCH_CHECK_VALUE((g_db->dim() == 1 && g_db->size(0) == O) ||
                            (g_db->dim() == 2 && g_db->size(0) == grad_out.size(0) && g_db->size(1) == O),
                        "g_db must be [O] or [T, O] with T = ", grad_out.size(0), ", O = ", O, ", got ",
                        g_db->sizes());
      add_bias_gradient(d_grad_out, g_db->stride(-1) == 1 ? *g_db : g_db->contiguous(), written);
    } else if (!written) {
      d_grad_out.zero_();
    }
  }
  if (mask_at(output_mask, 1))
    d_x = g_dw.has_value() ? task_linear_input_grad(grad_out, *g_dw) : at::zeros_like(x);
  if (mask_at(output_mask, 2))
    d_w = g_dx.has_value() ? task_linear_weight_grad(grad_out, *g_dx, w.dim() == 2) : at::zeros(w.sizes(), w.options());
  return {d_grad_out, d_x, d_w};
}

// ---------------------------------------------------------------------------------------
// The eager path's autograd nodes in C++ (see task_conv2d.cpp): task_linear (its fused
// activation's gradient through activation_grad's node, activation.cpp), and task_linear_backward, what fastmeta/ops/task_linear.py's Python
// nodes do. The public op takes them where its `_linear_native_node` says.
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

// A weight or bias as the kernels take it (fastmeta/ops/task_linear.py's _native_per_task):
// contiguous, or per task with contiguous rows at any nonzero task stride; a task stride of
// 0 → the shared tensor; anything else a contiguous copy.
at::Tensor native_per_task(const at::Tensor& t, bool task_dim) {
  if (!t.defined() || t.is_contiguous()) return t;
  if (task_dim) {
    const auto s = t.strides();
    if (s[0] != 0 && s.back() == 1 && (t.dim() == 2 || s[t.dim() - 2] == t.size(-1))) return t;
  }
  at::Tensor u = t;
  if (task_dim && u.dim() >= 2 && u.size(0) > 1 && u.stride(0) == 0) u = u.select(0, 0);
  return u.contiguous();
}

// The backward pair's weight (_native_weight_of_rank): a task stride of 0 kept (its
// gradient is per task), each task's block contiguous; else as native_per_task.
at::Tensor native_weight_of_rank(const at::Tensor& w) {
  if (w.defined() && w.dim() == 3 && w.size(0) > 1 && w.stride(0) == 0 && w[0].is_contiguous()) return w;
  return native_per_task(w, w.defined() && w.dim() == 3);
}

std::tuple<at::Tensor, at::Tensor> public_linear_double_backward(const at::Tensor& g_dx, const at::Tensor& g_dw,
                                                                 const at::Tensor& grad_out, const at::Tensor& x,
                                                                 const at::Tensor& w, const c10::List<bool>& mask,
                                                                 const at::Tensor& g_db, at::Tensor& d_w) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmeta::task_linear_double_backward", "");
  const torch::jit::Stack out = call_public_op(op, {maybe(g_dx), maybe(g_dw), grad_out, x, w, mask, maybe(g_db)});
  d_w = out[2].toTensor();
  return {out[0].toTensor(), out[1].toTensor()};
}

struct TaskLinearBackwardNode : public torch::autograd::Function<TaskLinearBackwardNode> {
  // (dx, dw, db) = task_linear_backward(grad_out, x, w, ...): inputs grad_out (edge 0), x (1),
  // w (2), then the addends that are given.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& w, bool want_dx, bool want_dw, bool want_db, bool bias_shared,
                               const c10::optional<at::Tensor>& dx_addend, const c10::optional<at::Tensor>& dw_addend) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_out, x, w});
    ctx->saved_data["want_dx"] = want_dx;
    ctx->saved_data["want_dw"] = want_dw;
    ctx->saved_data["want_db"] = want_db;
    ctx->saved_data["edges"] =
        edge_indices({true, true, true, dx_addend.has_value(), dw_addend.has_value()});
    auto [dx, dw, db] = recorded("fastmeta::task_linear_backward", "fastmeta_ext::task_linear_backward", [&] {
      return task_linear_backward(grad_out.contiguous(), x.contiguous(), native_weight_of_rank(w),
                                  bool_list({want_dx, want_dw, want_db}), contiguous(dx_addend), contiguous(dw_addend),
                                  bias_shared);
    });
    return {dx, dw, db};
  }

  // d_x comes only from g_dw and d_w only from g_dx: without its upstream a gradient is zero,
  // returned undefined. The addends' gradients: the upstream of dx / dw, unchanged.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &x = saved[1], &w = saved[2];
    const auto edges = ctx->saved_data["edges"].toIntVector();
    // A gradient of an output the mask left out (empty) carries nothing.
    const at::Tensor none;
    const at::Tensor g_dx = ctx->saved_data["want_dx"].toBool() ? grads[0] : none;
    const at::Tensor g_dw = ctx->saved_data["want_dw"].toBool() ? grads[1] : none;
    const at::Tensor g_db = ctx->saved_data["want_db"].toBool() ? grads[2] : none;
    const at::Tensor d_ax = needs_grad(ctx, edges[3]) ? g_dx : none;
    const at::Tensor d_aw = needs_grad(ctx, edges[4]) ? g_dw : none;
    const bool m0 = needs_grad(ctx, edges[0]) && (g_dx.defined() || g_dw.defined() || g_db.defined());
    const bool m1 = needs_grad(ctx, edges[1]) && g_dw.defined();
    const bool m2 = needs_grad(ctx, edges[2]) && g_dx.defined();
    at::Tensor d_grad_out, d_x, d_w;
    if (m0 || m1 || m2) {
      const c10::List<bool> mask = bool_list({m0, m1, m2});
      if (at::GradMode::is_enabled()) {  // third order: the public op, with torch.library's autograd
        std::tie(d_grad_out, d_x) =
            public_linear_double_backward(g_dx, g_dw, grad_out, x, w, mask, m0 ? g_db : none, d_w);
      } else {
        std::tie(d_grad_out, d_x, d_w) =
            recorded("fastmeta::task_linear_double_backward", "fastmeta_ext::task_linear_double_backward", [&] {
              return task_linear_double_backward(contiguous(g_dx), maybe(native_weight_of_rank(g_dw)),
                                                 grad_out.contiguous(), x.contiguous(), native_weight_of_rank(w),
                                                 mask, m0 ? maybe(g_db) : c10::nullopt);
            });
      }
      if (!m0) d_grad_out = none;
      if (!m1) d_x = none;
      if (!m2) d_w = none;
    }
    // One per forward argument: grad_out, x, w, want_dx, want_dw, want_db, bias_shared, the addends.
    return {d_grad_out, d_x, d_w, none, none, none, none, d_ax, d_aw};
  }
};

struct TaskLinearNode : public torch::autograd::Function<TaskLinearNode> {
  // y = act(task_linear(x, w, b)), and an alias of x and of w where asked
  // (outputs_with_aliases). With an activation the node saves y, from which its backward
  // reads f' through activation_grad's node (activation.cpp), as the Python node does.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const c10::optional<at::Tensor>& b, std::string act, double negative_slope,
                               bool alias_x, bool alias_w) {
    ctx->set_materialize_grads(false);
    at::Tensor y = recorded(nullptr, "fastmeta_ext::task_linear", [&] {
      const at::Tensor bias = b.has_value() ? native_per_task(*b, b->dim() == 2) : at::Tensor();
      return task_linear(x, native_per_task(w, w.dim() == 3), maybe(bias), act, negative_slope);
    });
    ctx->saved_data["has_bias"] = b.has_value();
    ctx->saved_data["bias_shared"] = b.has_value() && b->dim() == 1;
    ctx->saved_data["act"] = act;
    ctx->saved_data["negative_slope"] = negative_slope;
    const at::Tensor saved_y = act != "none" ? y : at::Tensor();
    return outputs_with_aliases(ctx, std::move(y), x, w, alias_x, alias_w, saved_y);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none;
    const at::Tensor grad_y = grads[0];
    const auto [add_x, add_w] = alias_grads(ctx, grads);
    const bool want_dx = ctx->needs_input_grad(0), want_dw = ctx->needs_input_grad(1);
    const bool want_db = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2);
    const bool bias_shared = ctx->saved_data["bias_shared"].toBool();
    // One per forward argument: x, w, b, act, negative_slope, alias_x, alias_w.
    if (!grad_y.defined())  // only the aliases were read
      return {want_dx ? add_x : none, want_dw ? add_w : none, none, none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const std::string act = ctx->saved_data["act"].toStringRef();
    // The gradient at the pre-activation: grad_y · f'(y), y read back from the saved output.
    const at::Tensor grad_z = act == "none" ? grad_y
                                            : activation_grad_on_node(grad_y, saved[2], act,
                                                                      ctx->saved_data["negative_slope"].toDouble());
    at::Tensor dx, dw, db;
    // The bias's gradient inside the pair op: no sum of its own (nor, at second order, an add).
    if (want_dx || want_dw || want_db) {
      const auto ax = want_dx ? maybe(add_x) : c10::nullopt;
      const auto aw = want_dw ? maybe(add_w) : c10::nullopt;
      if (at::GradMode::is_enabled()) {
        const variable_list out =
            TaskLinearBackwardNode::apply(grad_z, x, w, want_dx, want_dw, want_db, bias_shared, ax, aw);
        dx = out[0];
        dw = out[1];
        db = out[2];
      } else {
        std::tie(dx, dw, db) = recorded("fastmeta::task_linear_backward", "fastmeta_ext::task_linear_backward", [&] {
          return task_linear_backward(grad_z.contiguous(), x.contiguous(), native_weight_of_rank(w),
                                      bool_list({want_dx, want_dw, want_db}), contiguous(ax), contiguous(aw),
                                      bias_shared);
        });
      }
      if (!want_dx) dx = none;
      if (!want_dw) dw = none;
      if (!want_db) db = none;
    }
    return {dx, dw, db, none, none, none, none};
  }
};

std::vector<at::Tensor> task_linear_node(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                         c10::string_view act, double negative_slope, bool alias_x, bool alias_w) {
  return TaskLinearNode::apply(x, w, b, std::string(act.data(), act.size()), negative_slope, alias_x, alias_w);
}

// task_linear_input_grad (dx = grad_out @ w) and task_linear_weight_grad (dw = grad_outᵀ @ x),
// called as ops of their own (a user's hand-written backward): each one's backward is the
// layer and the other, as the Python nodes compute them (the same kernels on the same
// arguments). Where the backward itself records (third order), through the public ops.
at::Tensor linear_of(const at::Tensor& x, const at::Tensor& w) {  // task_linear(x, w) without bias or activation
  if (at::GradMode::is_enabled()) return public_op_output("fastmeta::task_linear", {x, w, c10::IValue(), "none", 0.0});
  return recorded("fastmeta::task_linear", "fastmeta_ext::task_linear", [&] {
    return task_linear(x.contiguous(), native_per_task(w, w.dim() == 3), c10::nullopt, "none", 0.0);
  });
}

at::Tensor input_grad_of(const at::Tensor& grad_out, const at::Tensor& w) {
  if (at::GradMode::is_enabled()) return public_op_output("fastmeta::task_linear_input_grad", {grad_out, w});
  return recorded("fastmeta::task_linear_input_grad", "fastmeta_ext::task_linear_input_grad", [&] {
    return task_linear_input_grad(grad_out.contiguous(), native_per_task(w, w.dim() == 3));
  });
}

at::Tensor weight_grad_of(const at::Tensor& grad_out, const at::Tensor& x, bool shared) {
  if (at::GradMode::is_enabled())
    return public_op_output("fastmeta::task_linear_weight_grad", {grad_out, x, shared});
  return recorded("fastmeta::task_linear_weight_grad", "fastmeta_ext::task_linear_weight_grad", [&] {
    return task_linear_weight_grad(grad_out.contiguous(), x.contiguous(), shared);
  });
}

struct TaskLinearInputGradNode : public torch::autograd::Function<TaskLinearInputGradNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& w) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_out, w});
    return {recorded(nullptr, "fastmeta_ext::task_linear_input_grad", [&] {
      return task_linear_input_grad(grad_out.contiguous(), native_per_task(w, w.dim() == 3));
    })};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none, &upstream = grads[0];
    if (!upstream.defined()) return {none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &w = saved[1];
    return {ctx->needs_input_grad(0) ? linear_of(upstream, w) : none,
            ctx->needs_input_grad(1) ? weight_grad_of(grad_out, upstream, w.dim() == 2) : none};
  }
};

struct TaskLinearWeightGradNode : public torch::autograd::Function<TaskLinearWeightGradNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x, bool shared) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_out, x});
    return {recorded(nullptr, "fastmeta_ext::task_linear_weight_grad", [&] {
      return task_linear_weight_grad(grad_out.contiguous(), x.contiguous(), shared);
    })};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none, &upstream = grads[0];
    if (!upstream.defined()) return {none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &x = saved[1];
    // One per forward argument: grad_out, x, shared.
    return {ctx->needs_input_grad(0) ? linear_of(x, upstream) : none,
            ctx->needs_input_grad(1) ? input_grad_of(grad_out, upstream) : none, none};
  }
};

std::vector<at::Tensor> task_linear_input_grad_node(const at::Tensor& grad_out, const at::Tensor& w) {
  return TaskLinearInputGradNode::apply(grad_out, w);
}

std::vector<at::Tensor> task_linear_weight_grad_node(const at::Tensor& grad_out, const at::Tensor& x, bool shared) {
  return TaskLinearWeightGradNode::apply(grad_out, x, shared);
}

// The public task_linear_backward's entry to its node (see task_conv2d_backward_node).
std::vector<at::Tensor> task_linear_backward_node(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                                  c10::List<bool> output_mask,
                                                  const c10::optional<at::Tensor>& dx_addend,
                                                  const c10::optional<at::Tensor>& dw_addend, bool bias_shared) {
  TORCH_CHECK_VALUE(output_mask.size() == 2 || output_mask.size() == 3,
                    "task_linear_backward: output_mask must have 2 or 3 entries (dx, dw[, db]), got ",
                    output_mask.size());
  return TaskLinearBackwardNode::apply(grad_out, x, w, output_mask.get(0), output_mask.get(1),
                                       output_mask.size() == 3 && output_mask.get(2), bias_shared, dx_addend,
                                       dw_addend);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("task_linear", &fastmeta::cpu::task_linear);
  m.impl("task_linear_input_grad", &fastmeta::cpu::task_linear_input_grad);
  m.impl("task_linear_weight_grad", &fastmeta::cpu::task_linear_weight_grad);
  m.impl("task_linear_backward", &fastmeta::cpu::task_linear_backward);
  m.impl("task_linear_double_backward", &fastmeta::cpu::task_linear_double_backward);
}

// The eager node's entry (see task_conv2d_node in task_conv2d.cpp).
TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("task_linear_node(Tensor x, Tensor w, Tensor? b, str act, float negative_slope, bool alias_x, "
        "bool alias_w) -> Tensor[]");
  m.def("task_linear_backward_node(Tensor grad_out, Tensor x, Tensor w, bool[] output_mask, Tensor? dx_addend, "
        "Tensor? dw_addend, bool bias_shared) -> Tensor[]");
  m.def("task_linear_input_grad_node(Tensor grad_out, Tensor w) -> Tensor[]");
  m.def("task_linear_weight_grad_node(Tensor grad_out, Tensor x, bool shared) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("task_linear_node", &fastmeta::cpu::task_linear_node);
  m.impl("task_linear_backward_node", &fastmeta::cpu::task_linear_backward_node);
  m.impl("task_linear_input_grad_node", &fastmeta::cpu::task_linear_input_grad_node);
  m.impl("task_linear_weight_grad_node", &fastmeta::cpu::task_linear_weight_grad_node);
}
