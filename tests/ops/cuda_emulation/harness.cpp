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
                         long bb, long br, long bc, float* C, const float* bias, long bias_b, int act, float slope,
                         int accumulate) {
  launch_batched_gemm(batches, M, N, K, Strided{A, ab, ar, ac}, Strided{B, bb, br, bc}, C, bias, bias_b, act, slope,
                      accumulate != 0, nullptr);
}
extern "C" void run_gemm_pair(long b1, long M1, long N1, long K1, const float* A1, long ab1, long ar1, long ac1,
                              const float* B1, long bb1, long br1, long bc1, float* C1, const float* add1, long b2,
                              long M2, long N2, long K2, const float* A2, long ab2, long ar2, long ac2,
                              const float* B2, long bb2, long br2, long bc2, float* C2, const float* add2) {
  launch_batched_gemm_pair(Gemm{b1, M1, N1, K1, Strided{A1, ab1, ar1, ac1}, Strided{B1, bb1, br1, bc1}, C1, nullptr, 0,
                                0, 0.f, false, add1},
                           Gemm{b2, M2, N2, K2, Strided{A2, ab2, ar2, ac2}, Strided{B2, bb2, br2, bc2}, C2, nullptr, 0,
                                0, 0.f, false, add2},
                           nullptr);
}
extern "C" void run_gemm_with_addend(long batches, long M, long N, long K, const float* A, long ab, long ar, long ac,
                                     const float* B, long bb, long br, long bc, float* C, const float* addend) {
  launch_batched_gemm(batches, M, N, K, Strided{A, ab, ar, ac}, Strided{B, bb, br, bc}, C, nullptr, 0, 0, 0.f, false,
                      nullptr, addend);
}
extern "C" void run_loss(const float* pred, const void* target, int kind, long T, long N, long C, long M, float* out, int grad) {
  if (grad) launch_task_loss_grad(pred, target, kind, T, N, C, M, out, nullptr);
  else launch_task_loss(pred, target, kind, T, N, C, M, out, nullptr);
}
extern "C" void run_loss_grad_backward(const float* upstream, const float* pred, int kind, long T, long N, long C,
                                       long M, float* out) {
  launch_task_loss_grad_backward(upstream, pred, kind, T, N, C, M, out, nullptr);
}
