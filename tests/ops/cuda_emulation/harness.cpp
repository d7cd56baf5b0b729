// C entry points over the CUDA launchers (csrc/cuda/*.cuh) for the emulation test
// (tests/ops/test_cuda_emulated.py): raw pointers in, so that Python calls them through ctypes with torch CPU tensors.
#include <cuda_runtime.h>
#include "inner_step.cuh"
#include "mlp_meta_step.cuh"
#include "task_linear.cuh"
#include "task_loss.cuh"
#include <algorithm>
using namespace fastmeta::cuda;
extern "C" int run_mlp(const long* sizes, int nsizes, const float* theta, const float* sx, const void* sy, const float* qx,
                       const void* qy, const float* lr, int rate_kind, int steps, int T, int K, int Q, int act, int loss,
                       float slope, int first_order, float* losses, float* preds, float* gtheta, float* glr, int lr_numel) {
  MlpDims d{};
  int L = nsizes - 1;
  d.L = L;
  for (int l = 0; l <= L; ++l) d.n[l] = sizes[l];
  long P = 0, cum = 0;
  for (int l = 0; l < L; ++l) { d.offW[l] = P; P += sizes[l + 1] * sizes[l]; d.offB[l] = P; P += sizes[l + 1]; }
  d.cum[0] = d.cum[1] = 0;
  for (int l = 1; l <= L; ++l) { cum += sizes[l]; d.cum[l + 1] = cum; }
  d.P = P; d.Hs = cum; d.Es = cum - sizes[L]; d.nmax = 0;
  for (int l = 0; l <= L; ++l) d.nmax = std::max(d.nmax, d.n[l]);
  MlpArgs a{};
  a.d = d; a.theta = theta; a.sx = sx; a.sy = sy; a.qx = qx; a.qy = qy; a.lr = lr; a.rate_kind = rate_kind;
  a.steps = steps; a.K = K; a.Q = Q; a.act = act; a.loss = loss; a.slope = slope; a.first_order = first_order;
  a.grads = gtheta != nullptr; a.losses = losses; a.preds = preds; a.gtheta = gtheta; a.glr = glr; a.lr_per_task = lr_numel;
  long floats = mlp_smem_floats(d, steps, K, Q);
  if (floats > (1 << 22)) return -1;
  return launch_mlp_meta_step(a, T, floats * 4, nullptr);
}
extern "C" void run_inner_step(const float* theta, int shared, const float* g, const float* lr, const long* seg,
                               const float* mask, const float* pc, int scalar, long T, long P, float* out) {
  launch_inner_step(theta, shared, g, StepCoef{lr, (const int64_t*)seg, mask, pc, (bool)scalar}, T, P, out, nullptr);
}
extern "C" void run_inner_step_backward(const float* go, const float* g, const float* lr, const long* seg, const float* mask,
    const float* pc, int scalar, long T, long P, long S, int theta_shared, float* dth, float* dg, float* dl, float* dm, float* dp, int reduce) {
  launch_inner_step_backward(go, g, StepCoef{lr, (const int64_t*)seg, mask, pc, (bool)scalar}, T, P, S, theta_shared, dth, dg, dl, dm, dp, reduce, nullptr);
}
extern "C" void run_gemm(long batches, long M, long N, long K, const float* A, long ab, long ar, long ac, const float* B,
                         long bb, long br, long bc, float* C, const float* bias, long bias_b, int act, float slope) {
  const Gemm g{batches, M, N, K, Strided{A, ab, ar, ac}, Strided{B, bb, br, bc}, C, bias, bias_b, act, slope, nullptr};
  launch_batched_gemms(&g, 1, nullptr);
}
extern "C" void run_gemm_with_addend(long batches, long M, long N, long K, const float* A, long ab, long ar, long ac,
                                     const float* B, long bb, long br, long bc, float* C, const float* addend) {
  const Gemm g{batches, M, N, K, Strided{A, ab, ar, ac}, Strided{B, bb, br, bc}, C, nullptr, 0, 0, 0.f, addend};
  launch_batched_gemms(&g, 1, nullptr);
}
// count GEMMs (act none, no bias) in one launch. Per GEMM, spec holds 17 values: batches,
// M, N, K, A's three strides, B's three, K2, A2's three strides, B2's three (K2 = 0: one
// term); ptrs holds 6: A, B, C, addend, A2, B2 (null where absent).
extern "C" void run_gemm_group(int count, const long* spec, const float* const* ptrs) {
  Gemm gemms[kMaxGemms];
  for (int i = 0; i < count; ++i) {
    const long* s = spec + 17 * i;
    const float* const* p = ptrs + 6 * i;
    gemms[i] = Gemm{s[0], s[1], s[2], s[3], Strided{p[0], s[4], s[5], s[6]}, Strided{p[1], s[7], s[8], s[9]},
                    const_cast<float*>(p[2]), nullptr, 0, 0, 0.f, p[3], s[10], Strided{p[4], s[11], s[12], s[13]},
                    Strided{p[5], s[14], s[15], s[16]}};
  }
  launch_batched_gemms(gemms, count, nullptr);
}
extern "C" void run_loss(const float* pred, const void* target, int kind, long T, long N, long C, long M, float* out, int grad) {
  if (grad) launch_task_loss_grad(pred, target, kind, T, N, C, M, nullptr, 0, out, nullptr);
  else launch_task_loss(pred, target, kind, T, N, C, M, out, nullptr, nullptr);
}
// The loss and its (unscaled) gradient from one launch of task_loss_and_grad_kernel.
extern "C" void run_loss_and_grad(const float* pred, const void* target, int kind, long T, long N, long C, long M,
                                  float* loss, float* grad) {
  launch_task_loss_and_grad(pred, target, kind, T, N, C, M, loss, grad, nullptr);
}
// The cross-entropy loss and accuracy from one launch of task_loss_kernel.
extern "C" void run_loss_and_accuracy(const float* pred, const long* target, long T, long N, long C, float* loss,
                                      float* accuracy) {
  launch_task_loss(pred, target, 0, T, N, C, N * C, loss, accuracy, nullptr);
}
// task_loss_grad with each task's gradient times scale[t * scale_stride].
extern "C" void run_loss_grad_scaled(const float* pred, const void* target, int kind, long T, long N, long C, long M,
                                     const float* scale, long scale_stride, float* out) {
  launch_task_loss_grad(pred, target, kind, T, N, C, M, scale, scale_stride, out, nullptr);
}
extern "C" void run_loss_grad_backward(const float* upstream, const float* pred, int kind, long T, long N, long C,
                                       long M, float* out) {
  launch_task_loss_grad_backward(upstream, pred, kind, T, N, C, M, out, nullptr);
}
// d grad_out = A·B + A2·B2 + bias (the double backward's g_db as its epilogue bias; K = 0
// and K2 = 0: the bias alone), one GEMM.
extern "C" void run_gemm_two_terms_with_bias(const long* s, const float* const* p, const float* bias, long bias_b) {
  const Gemm g{s[0], s[1], s[2], s[3], Strided{p[0], s[4], s[5], s[6]}, Strided{p[1], s[7], s[8], s[9]},
               const_cast<float*>(p[2]), bias, bias_b, 0, 0.f, nullptr, s[10], Strided{p[4], s[11], s[12], s[13]},
               Strided{p[5], s[14], s[15], s[16]}};
  launch_batched_gemms(&g, 1, nullptr);
}
extern "C" void run_accuracy(const float* pred, const int64_t* target, long T, long N, long C, float* out) {
  launch_task_accuracy(pred, target, T, N, C, out, nullptr);
}
