// Host side of the task_linear family on CUDA: checks, allocation, the batched GEMM launch.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <initializer_list>
#include <tuple>
#include <utility>
#include <vector>

#include "host_common.h"
#include "task_linear.cuh"

namespace fastmeta {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------------
// task_linear family
// ---------------------------------------------------------------------------------------

// One launch of the given GEMMs together (the backward's two gradients; the double
// backward's three: one launch instead of two or three).
void run_gemms(std::initializer_list<Gemm> gemms) {
  TORCH_INTERNAL_ASSERT(gemms.size() >= 1 && gemms.size() <= static_cast<size_t>(kMaxGemms));
  int64_t batches = 0;
  for (const Gemm& g : gemms) {
    batches += g.batches;
    TORCH_CHECK_NOT_IMPLEMENTED((g.M + 31) / 32 <= 65535, "at most 65535·32 rows per task, got ", g.M);
  }
  TORCH_CHECK_NOT_IMPLEMENTED(batches <= 65535, "at most 65535 tasks per launch (grid z), got ", batches);
  launch_batched_gemms(gemms.begin(), static_cast<int>(gemms.size()), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The GEMMs that were wanted (empty outputs launch nothing), in one launch where their
// batches together fit grid z; else one launch each, as before they were grouped.
void run_wanted(std::initializer_list<c10::optional<Gemm>> wanted) {
  std::vector<Gemm> gemms;
  int64_t batches = 0;
  for (const auto& g : wanted)
    if (g) {
      gemms.push_back(*g);
      batches += g->batches;
    }
  if (gemms.empty()) return;
  if (batches <= 65535) {
    switch (gemms.size()) {
      case 1: run_gemms({gemms[0]}); return;
      case 2: run_gemms({gemms[0], gemms[1]}); return;
      default: run_gemms({gemms[0], gemms[1], gemms[2]}); return;
    }
  }
  for (const Gemm& g : gemms) run_gemms({g});
}

void gemm(int64_t batches, int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* C, const float* bias,
          int64_t bias_b, int act, float slope, const float* addend = nullptr) {
  run_gemms({Gemm{batches, M, N, K, A, B, C, bias, bias_b, act, slope, addend}});
}

at::Tensor task_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       c10::string_view act_name, double negative_slope) {
  FM_CHECK_CUDA_F32(x);
  FM_CHECK_DIM(x, 3);
  FM_CHECK_CUDA_F32(w);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2);
  TORCH_CHECK_VALUE(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), "w must be [T, O, I] or [O, I]");
  TORCH_CHECK_VALUE(w.size(-1) == I, "w must have ", I, " input features, got ", w.sizes());
  const int64_t O = w.size(-2);
  int64_t bias_b = 0;
  if (b.has_value()) {
    FM_CHECK_CUDA_F32(*b);
    TORCH_CHECK_VALUE((b->dim() == 1 && b->size(0) == O) || (b->dim() == 2 && b->size(0) == T && b->size(1) == O),
                "b must be [O] or [T, O]");
    bias_b = b->dim() == 2 ? O : 0;
  }
  const int act = static_cast<int>(parse_act(std::string(act_name.data(), act_name.size())));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({T, N, O}, x.options());
  if (y.numel() == 0) return y;
  // B[k = i, n = o] = w[o, i]; a shared w has batch stride 0.
  gemm(T, N, O, I, Strided{x.data_ptr<float>(), N * I, I, 1},
       Strided{w.data_ptr<float>(), w.dim() == 2 ? 0 : O * I, 1, I}, y.data_ptr<float>(),
       b.has_value() ? b->data_ptr<float>() : nullptr, bias_b, act, static_cast<float>(negative_slope));
  return y;
}

at::Tensor task_linear_input_grad(const at::Tensor& grad_out, const at::Tensor& w) {
  FM_CHECK_CUDA_F32(grad_out);
  FM_CHECK_DIM(grad_out, 3);
  FM_CHECK_CUDA_F32(w);
  const int64_t T = grad_out.size(0), N = grad_out.size(1), O = grad_out.size(2);
  TORCH_CHECK_VALUE(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), "w must be [T, O, I] or [O, I]");
  TORCH_CHECK_VALUE(w.size(-2) == O, "w must have ", O, " output features");
  const int64_t I = w.size(-1);
  c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor out = at::empty({T, N, I}, grad_out.options());
  if (out.numel() == 0) return out;
  gemm(T, N, I, O, Strided{grad_out.data_ptr<float>(), N * O, O, 1},
       Strided{w.data_ptr<float>(), w.dim() == 2 ? 0 : O * I, I, 1}, out.data_ptr<float>(), nullptr, 0,
       static_cast<int>(Act::None), 0.f);
  return out;
}

// dw = grad_outᵀ·x (+ addend: dw's shape, contiguous fp32 on the device, added in the
// epilogue): the output, allocated, and its GEMM (none where the output is empty).
std::pair<at::Tensor, c10::optional<Gemm>> weight_grad_gemm(const at::Tensor& grad_out, const at::Tensor& x,
                                                             bool shared, const float* addend) {
  FM_CHECK_CUDA_F32(grad_out);
  FM_CHECK_CUDA_F32(x);
  FM_CHECK_DIM(grad_out, 3);
  FM_CHECK_DIM(x, 3);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2), O = grad_out.size(2);
  TORCH_CHECK_VALUE(grad_out.size(0) == T && grad_out.size(1) == N, "grad_out must be [T, N, O] like x");
  at::Tensor out = shared ? at::empty({O, I}, x.options()) : at::empty({T, O, I}, x.options());
  if (out.numel() == 0) return {out, c10::nullopt};
  const int none = static_cast<int>(Act::None);
  // A[m = o, k = n] = grad_out[n, o]; shared: the task and example dims merged (K = T·N).
  if (shared)
    return {out, Gemm{1, O, I, T * N, Strided{grad_out.data_ptr<float>(), 0, 1, O},
                      Strided{x.data_ptr<float>(), 0, I, 1}, out.data_ptr<float>(), nullptr, 0, none, 0.f, addend}};
  return {out, Gemm{T, O, I, N, Strided{grad_out.data_ptr<float>(), N * O, 1, O},
                    Strided{x.data_ptr<float>(), N * I, I, 1}, out.data_ptr<float>(), nullptr, 0, none, 0.f, addend}};
}

at::Tensor task_linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, bool shared) {
  c10::cuda::CUDAGuard guard(x.device());
  auto [out, dw] = weight_grad_gemm(grad_out, x, shared, nullptr);
  run_wanted({dw});
  return out;
}

// ---------------------------------------------------------------------------------------
// task_linear_backward and task_linear_double_backward: the GEMMs above, a weight read at
// its task stride (0 for θ.expand: its rank, not its stride, says whether dw is summed)
// ---------------------------------------------------------------------------------------

// A weight's batch stride: 0 for a 2-D (shared) one, else its task stride; within a task,
// contiguous.
int64_t weight_batch_stride(const at::Tensor& w, int64_t T, const char* name) {
  FM_CHECK_CUDA_F32(w);
  TORCH_CHECK_VALUE(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), name, " must be [T, O, I] or [O, I]");
  TORCH_CHECK_VALUE(w.stride(-1) == 1 && (w.size(-2) <= 1 || w.stride(-2) == w.size(-1)), name,
                    " must be contiguous within each task");
  return w.dim() == 2 ? 0 : w.stride(0);
}

// The GEMM of out = a·bᵀ: a [T, N, I] contiguous, b a weight [T, O, I] / [O, I] at batch
// stride bs.
Gemm product_gemm(const at::Tensor& a, const at::Tensor& b, int64_t bs, at::Tensor& out) {
  const int64_t T = a.size(0), N = a.size(1), I = a.size(2), O = b.size(-2);
  return Gemm{T, N, O, I, Strided{a.data_ptr<float>(), N * I, I, 1}, Strided{b.data_ptr<float>(), bs, 1, I},
              out.data_ptr<float>(), nullptr, 0, static_cast<int>(Act::None), 0.f, nullptr};
}

// The GEMM of out = g·w (+ addend, out's layout): g [T, N, O] contiguous, w [T, O, I] /
// [O, I] at batch stride ws.
Gemm input_grad_gemm(const at::Tensor& g, const at::Tensor& w, int64_t ws, at::Tensor& out,
                     const float* addend = nullptr) {
  const int64_t T = g.size(0), N = g.size(1), O = g.size(2), I = w.size(-1);
  return Gemm{T, N, I, O, Strided{g.data_ptr<float>(), N * O, O, 1}, Strided{w.data_ptr<float>(), ws, I, 1},
              out.data_ptr<float>(), nullptr, 0, static_cast<int>(Act::None), 0.f, addend};
}

// An addend as the GEMM's epilogue reads it: fp32 on the device, shaped as its output,
// contiguous (a copy where it is not); an undefined tensor where none is given.
at::Tensor epilogue_addend(const c10::optional<at::Tensor>& addend, at::IntArrayRef shape, const char* name) {
  if (!addend.has_value()) return at::Tensor();
  FM_CHECK_CUDA_F32(*addend);
  TORCH_CHECK_VALUE(addend->sizes() == shape, name, " must be shaped as its gradient ", shape, ", got ",
                    addend->sizes());
  return addend->contiguous();
}

const float* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

bool mask_at(const c10::List<bool>& mask, size_t i) { return mask.size() > i && mask.get(i); }

// db = 1ᵀ·grad_out: grad_out summed over the examples → [T, O], or over the tasks and
// examples (K = T·N) → [O] where the bias is shared; A null reads as ones (task_linear.cuh).
std::pair<at::Tensor, c10::optional<Gemm>> bias_grad_gemm(const at::Tensor& grad_out, bool shared) {
  const int64_t T = grad_out.size(0), N = grad_out.size(1), O = grad_out.size(2);
  at::Tensor out = shared ? at::empty({O}, grad_out.options()) : at::empty({T, O}, grad_out.options());
  if (out.numel() == 0) return {out, c10::nullopt};
  if (T * N == 0) return {out.zero_(), c10::nullopt};
  const int none = static_cast<int>(Act::None);
  // B[k = n, n = o] = grad_out[n, o]; C [1, O] per batch.
  if (shared)
    return {out, Gemm{1, 1, O, T * N, Strided{nullptr, 0, 0, 0}, Strided{grad_out.data_ptr<float>(), 0, O, 1},
                      out.data_ptr<float>(), nullptr, 0, none, 0.f, nullptr}};
  return {out, Gemm{T, 1, O, N, Strided{nullptr, 0, 0, 0}, Strided{grad_out.data_ptr<float>(), N * O, O, 1},
                    out.data_ptr<float>(), nullptr, 0, none, 0.f, nullptr}};
}

// dx_addend / dw_addend, when given, are added to dx / dw in the GEMMs' epilogues (no add
// launch of their own), as the CPU kernels add them in theirs. The mask's third entry asks
// for the bias's gradient (bias_grad_gemm). dx, dw and db are one launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor> task_linear_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                                    const at::Tensor& w,
                                                                    const c10::List<bool>& output_mask,
                                                                    const c10::optional<at::Tensor>& dx_addend,
                                                                    const c10::optional<at::Tensor>& dw_addend,
                                                                    bool bias_shared) {
  FM_CHECK_CUDA_F32(grad_out);
  FM_CHECK_DIM(grad_out, 3);
  TORCH_CHECK_VALUE(output_mask.size() == 2 || output_mask.size() == 3,
                    "output_mask must have 2 or 3 entries (dx, dw[, db]), got ", output_mask.size());
  const int64_t T = grad_out.size(0), N = grad_out.size(1), O = grad_out.size(2);
  const int64_t ws = weight_batch_stride(w, T, "w");
  TORCH_CHECK_VALUE(w.size(-2) == O, "w must have ", O, " output features");
  c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor d_x = at::empty({0}, grad_out.options());
  at::Tensor add_x, add_w;  // held until the launch is queued
  c10::optional<Gemm> dx_gemm, dw_gemm;
  if (mask_at(output_mask, 0)) {
    d_x = at::empty({T, N, w.size(-1)}, grad_out.options());
    add_x = epilogue_addend(dx_addend, d_x.sizes(), "dx_addend");
    if (d_x.numel()) dx_gemm = input_grad_gemm(grad_out, w, ws, d_x, data_or_null(add_x));
  }
  at::Tensor d_w = at::empty({0}, grad_out.options());
  if (mask_at(output_mask, 1)) {
    // dw has w's shape: [O, I] summed over tasks for a shared w, [T, O, I] per task.
    add_w = epilogue_addend(dw_addend, w.sizes(), "dw_addend");
    std::tie(d_w, dw_gemm) = weight_grad_gemm(grad_out, x, w.dim() == 2, data_or_null(add_w));
  }
  at::Tensor d_b = at::empty({0}, grad_out.options());
  c10::optional<Gemm> db_gemm;
  if (mask_at(output_mask, 2)) std::tie(d_b, db_gemm) = bias_grad_gemm(grad_out, bias_shared);
  run_wanted({dx_gemm, dw_gemm, db_gemm});
  return {d_x, d_w, d_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> task_linear_double_backward(
    const c10::optional<at::Tensor>& g_dx, const c10::optional<at::Tensor>& g_dw, const at::Tensor& grad_out,
    const at::Tensor& x, const at::Tensor& w, const c10::List<bool>& output_mask,
    const c10::optional<at::Tensor>& g_db) {
  FM_CHECK_CUDA_F32(grad_out);
  FM_CHECK_DIM(grad_out, 3);
  FM_CHECK_CUDA_F32(x);
  FM_CHECK_DIM(x, 3);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2), O = grad_out.size(2);
  TORCH_CHECK_VALUE(grad_out.size(0) == T && grad_out.size(1) == N, "grad_out must be [T, N, O] like x");
  const int64_t ws = weight_batch_stride(w, T, "w");
  TORCH_CHECK_VALUE(w.size(-2) == O && w.size(-1) == I, "w must be [.., ", O, ", ", I, "]");
  int64_t gws = 0;
  if (g_dw.has_value()) {
    gws = weight_batch_stride(*g_dw, T, "g_dw");
    TORCH_CHECK_VALUE(g_dw->dim() == w.dim() && g_dw->size(-2) == O && g_dw->size(-1) == I, "g_dw must be shaped as w");
  }
  if (g_dx.has_value()) {
    FM_CHECK_CUDA_F32(*g_dx);
    TORCH_CHECK_VALUE(g_dx->sizes() == x.sizes(), "g_dx must be shaped as x");
  }
  at::Tensor bias;  // g_db, its rows contiguous (read at its task stride): d grad_out's epilogue bias
  if (g_db.has_value()) {
    FM_CHECK_CUDA_F32(*g_db);
    TORCH_CHECK_VALUE((g_db->dim() == 1 && g_db->size(0) == O) || (g_db->dim() == 2 && g_db->size(0) == T &&
                                                                   g_db->size(1) == O),
                      "g_db must be [O] or [T, O], got ", g_db->sizes());
    bias = g_db->stride(-1) == 1 ? *g_db : g_db->contiguous();
  }
  c10::cuda::CUDAGuard guard(x.device());
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor d_grad_out = empty(), d_x = empty(), d_w = empty();
  // d grad_out = g_dx·wᵀ + x·g_dwᵀ + g_db: one GEMM of two terms (task_linear.cuh, Gemm's K2),
  // g_db its bias (broadcast over the examples; K = 0 where it is the only term).
  c10::optional<Gemm> d_grad_out_gemm;
  if (mask_at(output_mask, 0)) {
    d_grad_out = at::empty({T, N, O}, x.options());
    if (d_grad_out.numel()) {
      if (g_dx.has_value()) d_grad_out_gemm = product_gemm(*g_dx, w, ws, d_grad_out);
      if (g_dw.has_value()) {
        const Gemm second = product_gemm(x, *g_dw, gws, d_grad_out);
        if (d_grad_out_gemm) {
          d_grad_out_gemm->K2 = second.K;
          d_grad_out_gemm->A2 = second.A;
          d_grad_out_gemm->B2 = second.B;
        } else {
          d_grad_out_gemm = second;
        }
      }
      if (bias.defined()) {
        if (!d_grad_out_gemm)
          d_grad_out_gemm = Gemm{T, N, O, 0, Strided{nullptr, 0, 0, 0}, Strided{grad_out.data_ptr<float>(), 0, 0, 0},
                                 d_grad_out.data_ptr<float>(), nullptr, 0, static_cast<int>(Act::None), 0.f, nullptr};
        d_grad_out_gemm->bias = bias.data_ptr<float>();
        d_grad_out_gemm->bias_b = bias.dim() == 2 ? bias.stride(0) : 0;
      }
      if (!d_grad_out_gemm) d_grad_out.zero_();
    }
  }
  // d grad_out, d x and d w: one launch.
  c10::optional<Gemm> dx_gemm, dw_gemm;
  if (mask_at(output_mask, 1)) {
    if (g_dw.has_value()) {
      d_x = at::empty({T, N, I}, x.options());
      if (d_x.numel()) dx_gemm = input_grad_gemm(grad_out, *g_dw, gws, d_x);
    } else {
      d_x = at::zeros({T, N, I}, x.options());
    }
  }
  if (mask_at(output_mask, 2)) {
    if (g_dx.has_value())
      std::tie(d_w, dw_gemm) = weight_grad_gemm(grad_out, *g_dx, w.dim() == 2, nullptr);
    else
      d_w = at::zeros(w.sizes(), w.options());
  }
  run_wanted({d_grad_out_gemm, dx_gemm, dw_gemm});
  return {d_grad_out, d_x, d_w};
}

}  // namespace

}  // namespace cuda
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CUDA, m) {
  m.impl("task_linear", &fastmeta::cuda::task_linear);
  m.impl("task_linear_input_grad", &fastmeta::cuda::task_linear_input_grad);
  m.impl("task_linear_weight_grad", &fastmeta::cuda::task_linear_weight_grad);
  m.impl("task_linear_backward", &fastmeta::cuda::task_linear_backward);
  m.impl("task_linear_double_backward", &fastmeta::cuda::task_linear_double_backward);
}
