// Host side of the CUDA kernels: argument checks, output allocation, the launch on the
// current stream, and the registration of fastmeta_ext's CUDA implementations. Compiled
// by the host compiler (only into builds with CUDA sources); the kernels are in *.cu.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common.h"
#include "launchers.h"

namespace fastmeta {
namespace cuda {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

#define FM_CHECK_CUDA_F32(x)   \
  FM_CHECK_INPUT(x, kCUDA);    \
  TORCH_CHECK((x).scalar_type() == at::kFloat, #x " must be float32 on CUDA, got ", (x).scalar_type())

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// ---------------------------------------------------------------------------------------
// inner_step
// ---------------------------------------------------------------------------------------

StepCoef make_coef(const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                   const c10::optional<at::Tensor>& precond, const c10::optional<at::Tensor>& segments) {
  return StepCoef{lr.data_ptr<float>(), segments.has_value() ? segments->data_ptr<int64_t>() : nullptr,
                  mask.has_value() ? mask->data_ptr<float>() : nullptr,
                  precond.has_value() ? precond->data_ptr<float>() : nullptr, lr.dim() == 0};
}

void check_step(const at::Tensor& grad, const at::Tensor& lr, const c10::optional<at::Tensor>& mask,
                const c10::optional<at::Tensor>& precond, const c10::optional<at::Tensor>& segments) {
  FM_CHECK_CUDA_F32(grad);
  FM_CHECK_DIM(grad, 2);
  FM_CHECK_CUDA_F32(lr);
  const int64_t P = grad.size(1);
  for (const auto* o : {&mask, &precond})
    if (o->has_value()) {
      FM_CHECK_CUDA_F32(**o);
      TORCH_CHECK((*o)->dim() == 1 && (*o)->size(0) == P, "mask/precond must be [P] = [", P, "]");
    }
  if (segments.has_value()) {
    // Segment indices are trusted to lie in [0, S): validating them would cost a device
    // sync per step; the op layer builds them from the model's layout.
    FM_CHECK_INPUT(*segments, kCUDA);
    TORCH_CHECK(segments->scalar_type() == at::kLong && segments->dim() == 1 && segments->size(0) == P,
                "segments must be int64 [P]");
    // The backward sums per-segment rates in shared memory: 12288 floats = 48 KiB.
    TORCH_CHECK(lr.dim() == 1 && lr.size(0) <= 12288, "per-segment lr must be [S] with S <= 12288");
  } else {
    TORCH_CHECK(lr.dim() == 0 || (lr.dim() == 1 && lr.size(0) == P), "lr must be a scalar or [P] without segments");
  }
}

at::Tensor inner_step(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& lr,
                      const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& precond,
                      const c10::optional<at::Tensor>& segments) {
  check_step(grad, lr, mask, precond, segments);
  FM_CHECK_CUDA_F32(theta);
  const int64_t T = grad.size(0), P = grad.size(1);
  const bool shared = theta.dim() == 1;
  TORCH_CHECK(shared ? theta.size(0) == P : theta.sizes() == grad.sizes(), "theta must be [P] or [T, P] like grad");
  c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor out = at::empty_like(grad);
  if (out.numel() == 0) return out;
  launch_inner_step(theta.data_ptr<float>(), shared, grad.data_ptr<float>(), make_coef(lr, mask, precond, segments),
                    T, P, out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::vector<at::Tensor> inner_step_backward(const at::Tensor& grad_out, const at::Tensor& grad, const at::Tensor& lr,
                                            const c10::optional<at::Tensor>& mask,
                                            const c10::optional<at::Tensor>& precond,
                                            const c10::optional<at::Tensor>& segments, bool theta_shared,
                                            const c10::List<bool>& needs) {
  check_step(grad, lr, mask, precond, segments);
  FM_CHECK_CUDA_F32(grad_out);
  TORCH_CHECK(grad_out.sizes() == grad.sizes(), "grad_out must be like grad");
  TORCH_CHECK(needs.size() == 5, "needs must hold 5 flags");
  const int64_t T = grad.size(0), P = grad.size(1);
  const bool nt = needs.get(0), ng = needs.get(1), nl = needs.get(2);
  const bool nm = needs.get(3) && mask.has_value(), np = needs.get(4) && precond.has_value();
  c10::cuda::CUDAGuard guard(grad.device());
  auto empty = [&] { return at::empty({0}, grad.options()); };
  at::Tensor d_theta = nt ? (theta_shared ? at::empty({P}, grad.options()) : at::empty_like(grad)) : empty();
  at::Tensor d_grad = ng ? at::empty_like(grad) : empty();
  at::Tensor d_lr = nl ? at::zeros(lr.sizes(), lr.options()) : empty();
  at::Tensor d_mask = nm ? at::empty({P}, grad.options()) : empty();
  at::Tensor d_precond = np ? at::empty({P}, grad.options()) : empty();
  if (P > 0 && (nt || ng || nl || nm || np)) {
    const bool reduce_lr = nl && (lr.dim() == 0 || segments.has_value());
    const int64_t S = lr.dim() == 0 ? 1 : lr.size(0);
    launch_inner_step_backward(grad_out.data_ptr<float>(), grad.data_ptr<float>(),
                               make_coef(lr, mask, precond, segments), T, P, S, theta_shared,
                               nt ? d_theta.data_ptr<float>() : nullptr, ng ? d_grad.data_ptr<float>() : nullptr,
                               nl ? d_lr.data_ptr<float>() : nullptr, nm ? d_mask.data_ptr<float>() : nullptr,
                               np ? d_precond.data_ptr<float>() : nullptr, reduce_lr, stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (nt && theta_shared) {
    d_theta.zero_();
  }
  return {d_theta, d_grad, d_lr, d_mask, d_precond};
}

// ---------------------------------------------------------------------------------------
// task_linear family
// ---------------------------------------------------------------------------------------

void gemm(int64_t batches, int64_t M, int64_t N, int64_t K, Strided A, Strided B, float* C, const float* bias,
          int64_t bias_b, int act, float slope) {
  TORCH_CHECK(batches <= 65535, "at most 65535 tasks per launch (grid z), got ", batches);
  TORCH_CHECK((M + 31) / 32 <= 65535, "at most 65535·32 rows per task, got ", M);
  launch_batched_gemm(batches, M, N, K, A, B, C, bias, bias_b, act, slope, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor task_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       c10::string_view act_name, double negative_slope) {
  FM_CHECK_CUDA_F32(x);
  FM_CHECK_DIM(x, 3);
  FM_CHECK_CUDA_F32(w);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2);
  TORCH_CHECK(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), "w must be [T, O, I] or [O, I]");
  TORCH_CHECK(w.size(-1) == I, "w must have ", I, " input features, got ", w.sizes());
  const int64_t O = w.size(-2);
  int64_t bias_b = 0;
  if (b.has_value()) {
    FM_CHECK_CUDA_F32(*b);
    TORCH_CHECK((b->dim() == 1 && b->size(0) == O) || (b->dim() == 2 && b->size(0) == T && b->size(1) == O),
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
  TORCH_CHECK(w.dim() == 2 || (w.dim() == 3 && w.size(0) == T), "w must be [T, O, I] or [O, I]");
  TORCH_CHECK(w.size(-2) == O, "w must have ", O, " output features");
  const int64_t I = w.size(-1);
  c10::cuda::CUDAGuard guard(grad_out.device());
  at::Tensor out = at::empty({T, N, I}, grad_out.options());
  if (out.numel() == 0) return out;
  gemm(T, N, I, O, Strided{grad_out.data_ptr<float>(), N * O, O, 1},
       Strided{w.data_ptr<float>(), w.dim() == 2 ? 0 : O * I, I, 1}, out.data_ptr<float>(), nullptr, 0,
       static_cast<int>(Act::None), 0.f);
  return out;
}

at::Tensor task_linear_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, bool shared) {
  FM_CHECK_CUDA_F32(grad_out);
  FM_CHECK_CUDA_F32(x);
  FM_CHECK_DIM(grad_out, 3);
  FM_CHECK_DIM(x, 3);
  const int64_t T = x.size(0), N = x.size(1), I = x.size(2), O = grad_out.size(2);
  TORCH_CHECK(grad_out.size(0) == T && grad_out.size(1) == N, "grad_out must be [T, N, O] like x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = shared ? at::empty({O, I}, x.options()) : at::empty({T, O, I}, x.options());
  if (out.numel() == 0) return out;
  const int none = static_cast<int>(Act::None);
  // A[m = o, k = n] = grad_out[n, o]; shared: the task and example dims merged (K = T·N).
  if (shared)
    gemm(1, O, I, T * N, Strided{grad_out.data_ptr<float>(), 0, 1, O}, Strided{x.data_ptr<float>(), 0, I, 1},
         out.data_ptr<float>(), nullptr, 0, none, 0.f);
  else
    gemm(T, O, I, N, Strided{grad_out.data_ptr<float>(), N * O, 1, O}, Strided{x.data_ptr<float>(), N * I, I, 1},
         out.data_ptr<float>(), nullptr, 0, none, 0.f);
  return out;
}

// ---------------------------------------------------------------------------------------
// task_loss
// ---------------------------------------------------------------------------------------

void check_loss(const at::Tensor& pred, const at::Tensor& target, LossKind kind) {
  FM_CHECK_CUDA_F32(pred);
  FM_CHECK_INPUT(target, kCUDA);
  TORCH_CHECK(pred.dim() >= 2 && pred.size(0) > 0, "pred must be [T, N, ...]");
  if (kind == LossKind::CrossEntropy) {
    FM_CHECK_DIM(pred, 3);
    TORCH_CHECK(target.scalar_type() == at::kLong && target.dim() == 2 && target.size(0) == pred.size(0) &&
                    target.size(1) == pred.size(1),
                "cross-entropy target must be int64 [T, N]");
    TORCH_CHECK(pred.size(2) > 0, "cross-entropy needs at least one class");
  } else {
    TORCH_CHECK(target.scalar_type() == at::kFloat && target.sizes() == pred.sizes(), "MSE target must be like pred");
  }
}

at::Tensor task_loss(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss(pred, target, kind);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t T = pred.size(0), N = pred.size(1), M = pred.numel() / T;
  const int64_t C = kind == LossKind::CrossEntropy ? pred.size(2) : 1;
  at::Tensor out = at::empty({T}, pred.options());
  launch_task_loss(pred.data_ptr<float>(), target.data_ptr(), static_cast<int>(kind), T, N, C, M,
                   out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor task_loss_grad(const at::Tensor& pred, const at::Tensor& target, c10::string_view kind_name) {
  const LossKind kind = parse_loss(std::string(kind_name.data(), kind_name.size()));
  check_loss(pred, target, kind);
  c10::cuda::CUDAGuard guard(pred.device());
  const int64_t T = pred.size(0), N = pred.size(1), M = pred.numel() / T;
  const int64_t C = kind == LossKind::CrossEntropy ? pred.size(2) : 1;
  at::Tensor out = at::empty_like(pred);
  if (out.numel() == 0) return out;
  launch_task_loss_grad(pred.data_ptr<float>(), target.data_ptr(), static_cast<int>(kind), T, N, C, M,
                        out.data_ptr<float>(), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------
// mlp_meta_step
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step(
    const at::Tensor& theta, at::IntArrayRef layer_sizes, c10::string_view act_name, double negative_slope,
    const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x, const at::Tensor& query_y,
    c10::string_view loss_name, const at::Tensor& lr, int64_t steps, bool first_order, int64_t grads,
    const c10::optional<at::Tensor>& task_weights) {
  for (const at::Tensor* t : {&theta, &support_x, &support_y, &query_x, &query_y, &lr}) {
    FM_CHECK_INPUT(*t, kCUDA);
    TORCH_CHECK(t->device() == theta.device(), "all inputs must be on ", theta.device());
  }
  for (const at::Tensor* t : {&theta, &support_x, &query_x, &lr})
    TORCH_CHECK(t->scalar_type() == at::kFloat, "mlp_meta_step on CUDA takes float32");
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  // The kernel relies on nothing padding-related, but only these have f'' written out.
  TORCH_CHECK(act != Act::Sigmoid, "mlp_meta_step: act must be relu, leaky_relu, tanh or none");
  const LossKind loss = parse_loss(std::string(loss_name.data(), loss_name.size()));
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1;
  TORCH_CHECK(L >= 1 && L <= kMaxLayers, "mlp_meta_step on CUDA takes 1 to ", kMaxLayers, " layers");
  TORCH_CHECK(steps >= 0 && grads >= 0 && grads <= 2, "steps must be >= 0 and grads 0, 1 or 2");
  FM_CHECK_DIM(support_x, 3);
  FM_CHECK_DIM(query_x, 3);
  const int64_t T = support_x.size(0), K = support_x.size(1), Q = query_x.size(1), O = layer_sizes.back();
  TORCH_CHECK(T >= 1 && K >= 1 && Q >= 1 && query_x.size(0) == T, "need T, K, Q >= 1 and query_x [T, Q, I]");
  TORCH_CHECK(T <= 2147483647LL, "too many tasks for one grid");
  MlpDims d{};
  d.L = static_cast<int>(L);
  for (int64_t l = 0; l <= L; ++l) {
    TORCH_CHECK(layer_sizes[l] >= 1 && layer_sizes[l] <= 65536, "layer sizes must be in [1, 65536]");
    d.n[l] = static_cast<int>(layer_sizes[l]);
  }
  int64_t P = 0, cum = 0;
  for (int64_t l = 0; l < L; ++l) {
    d.offW[l] = static_cast<int>(P);
    P += layer_sizes[l + 1] * layer_sizes[l];
    d.offB[l] = static_cast<int>(P);
    P += layer_sizes[l + 1];
    TORCH_CHECK(P < (int64_t(1) << 30), "too many parameters for the fused kernel");
  }
  d.cum[0] = d.cum[1] = 0;
  for (int64_t l = 1; l <= L; ++l) {
    cum += layer_sizes[l];
    d.cum[l + 1] = static_cast<int>(cum);
  }
  d.P = static_cast<int>(P);
  d.Hs = static_cast<int>(cum);
  d.Es = static_cast<int>(cum - O);
  d.nmax = 0;
  for (int64_t l = 0; l <= L; ++l) d.nmax = std::max(d.nmax, d.n[l]);
  TORCH_CHECK(theta.dim() == 1 && theta.size(0) == P, "theta must be [", P, "] for layers ", layer_sizes);
  TORCH_CHECK(support_x.size(2) == layer_sizes[0] && query_x.size(2) == layer_sizes[0],
              "support_x and query_x must have ", layer_sizes[0], " features");
  if (loss == LossKind::Mse) {
    TORCH_CHECK(support_y.scalar_type() == at::kFloat && query_y.scalar_type() == at::kFloat, "MSE targets: float32");
    TORCH_CHECK(support_y.dim() == 3 && support_y.size(0) == T && support_y.size(1) == K && support_y.size(2) == O,
                "support_y must be [T, K, O]");
    TORCH_CHECK(query_y.dim() == 3 && query_y.size(0) == T && query_y.size(1) == Q && query_y.size(2) == O,
                "query_y must be [T, Q, O]");
  } else {
    // Labels are not range-checked here (a device sync); the kernel turns a bad one into
    // a NaN loss, never an out-of-bounds read.
    TORCH_CHECK(support_y.scalar_type() == at::kLong && query_y.scalar_type() == at::kLong, "labels must be int64");
    TORCH_CHECK(support_y.dim() == 2 && support_y.size(0) == T && support_y.size(1) == K, "support_y must be [T, K]");
    TORCH_CHECK(query_y.dim() == 2 && query_y.size(0) == T && query_y.size(1) == Q, "query_y must be [T, Q]");
  }
  int rate_kind;
  if (lr.dim() == 1) rate_kind = kRateStep;
  else if (lr.dim() == 2 && lr.size(1) == 2 * L) rate_kind = kRateTensor;
  else if (lr.dim() == 2 && lr.size(1) == P) rate_kind = kRatePerParam;
  else TORCH_CHECK(false, "lr must be [steps], [steps, ", 2 * L, "] or [steps, ", P, "], got ", lr.sizes());
  TORCH_CHECK(lr.size(0) == steps, "lr must have one row per step");
  c10::cuda::CUDAGuard guard(theta.device());
  const int64_t bytes = mlp_smem_floats(d, steps, K, Q) * static_cast<int64_t>(sizeof(float));
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, theta.get_device()));
  TORCH_CHECK(bytes <= limit, "mlp_meta_step: this MLP needs ", bytes, " bytes of shared memory per task; the GPU "
              "gives a block ", limit, " (the launcher should have sent it to the general path)");
  if (grads == 1) {
    TORCH_CHECK(task_weights.has_value() && task_weights->device() == theta.device() &&
                    task_weights->scalar_type() == at::kFloat && task_weights->is_contiguous() &&
                    task_weights->dim() == 1 && task_weights->size(0) == T,
                "grads == 1 needs float32 task_weights [T] on ", theta.device());
  }
  at::Tensor losses = at::empty({T}, theta.options());
  at::Tensor preds = at::empty({T, Q, O}, theta.options());
  std::vector<int64_t> lr_task_shape{T};
  for (auto s : lr.sizes()) lr_task_shape.push_back(s);
  at::Tensor gtheta = grads ? at::empty({T, P}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor glr = grads ? at::empty(lr_task_shape, theta.options()) : at::empty({0}, theta.options());
  MlpArgs a{};
  a.d = d;
  a.theta = theta.data_ptr<float>();
  a.sx = support_x.data_ptr<float>();
  a.sy = support_y.data_ptr();
  a.qx = query_x.data_ptr<float>();
  a.qy = query_y.data_ptr();
  a.lr = lr.data_ptr<float>();
  a.rate_kind = rate_kind;
  a.steps = static_cast<int>(steps);
  a.K = static_cast<int>(K);
  a.Q = static_cast<int>(Q);
  a.act = static_cast<int>(act);
  a.loss = static_cast<int>(loss);
  a.slope = static_cast<float>(negative_slope);
  a.first_order = first_order;
  a.grads = grads != 0;
  a.losses = losses.data_ptr<float>();
  a.preds = preds.data_ptr<float>();
  a.gtheta = grads ? gtheta.data_ptr<float>() : nullptr;
  a.glr = grads ? glr.data_ptr<float>() : nullptr;
  a.lr_per_task = static_cast<int>(lr.numel());
  C10_CUDA_CHECK(launch_mlp_meta_step(a, T, bytes, stream()));
  if (grads != 1) return {losses, preds, gtheta, glr};
  // Σ_t w_t · (per-task gradient): two GEMVs in a fixed order (deterministic).
  at::Tensor g_theta = at::mv(gtheta.t(), *task_weights);
  at::Tensor g_lr = steps == 0 ? at::zeros(lr.sizes(), lr.options())
                               : at::mv(glr.reshape({T, -1}).t(), *task_weights).reshape(lr.sizes());
  return {losses, preds, g_theta, g_lr};
}

}  // namespace
}  // namespace cuda
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CUDA, m) {
  m.impl("inner_step", &fastmeta::cuda::inner_step);
  m.impl("inner_step_backward", &fastmeta::cuda::inner_step_backward);
  m.impl("task_linear", &fastmeta::cuda::task_linear);
  m.impl("task_linear_input_grad", &fastmeta::cuda::task_linear_input_grad);
  m.impl("task_linear_weight_grad", &fastmeta::cuda::task_linear_weight_grad);
  m.impl("task_loss", &fastmeta::cuda::task_loss);
  m.impl("task_loss_grad", &fastmeta::cuda::task_loss_grad);
  m.impl("mlp_meta_step", &fastmeta::cuda::mlp_meta_step);
}
