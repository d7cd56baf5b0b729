// The fused small-MLP meta-step on CUDA: ONE launch for the whole meta-batch, one CTA per
// task. Each CTA runs its task's inner steps, query loss and (optionally) the exact
// meta-gradient w.r.t. θ and the rates with Hessian-vector products by the R-operator —
// the algorithm of csrc/cpu/mlp_meta_step.cpp (see its header for the derivation).
//
// Everything a task touches lives in shared memory; θ_0 (shared by all tasks) and the
// examples are read from global memory (L2-resident: W1's θ is 7 KiB). Shared floats:
//
//   2·S·P                   θ_1..θ_S and g_0..g_{S−1}
//   S·K·(2·Hs + Es)         per support step: activations h, deltas δ, e = δ·W
//   Q·(2·Hs + Es)           the query pass
//   2·P                     u = α ⊙ v (the HVP direction) and v (the running gradient)
//   2·K·Hs + 3·K·nmax       tangents Rz, Rh, two Rδ and Re
//   33                      block-sum scratch
//
// with P parameters, S steps, Hs = n1 + … + nL (every layer's output width), Es = Hs − nL,
// nmax the widest layer. THE SIZE LIMIT is this total × 4 bytes ≤ the device's opt-in
// shared memory per block (227 KiB on H100/H200); MLPs beyond it are declined by the
// launcher (fastmeta.backends.cuda_limits.cuda_fits asks for this formula) and checked again
// here. Depth is capped at kMaxLayers = 32 by the kernel-parameter struct; no MLP wide
// enough to be worth fusing reaches it within the shared-memory bound. W1 (1-40-40-1,
// K = Q = 10, 1 step) needs 14.8k floats = 58 KiB.
//
// Work split: every small matrix product is spread over the CTA's 256 threads, one output
// element per thread per pass, reading operands from shared memory; a __syncthreads()
// separates dependent products. Bound: latency of those dependent steps (W1 has ≈ 40 of
// them), not FLOPs (≈ 0.4 MFLOP per task): at 25 tasks the kernel runs ≈ 25 CTAs on
// 132 SMs, so the meta-batch costs about one CTA's time.
#include <cmath>
#include <cstdint>

#include "../log_sum_exp.h"
#include "common_cuda.cuh"
#include "mlp_meta_step.cuh"

namespace fastmeta {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMse = 1;  // fastmeta::LossKind::Mse

// C[M×N] = beta·C + alpha·A·B over the CTA; A(m,k) = A[m·ars + k·acs], B(k,n) = B[k·brs + n·bcs],
// C row-major. The caller synchronises before reading C.
__device__ void cta_gemm(int M, int N, int K, const float* A, int ars, int acs, const float* B, int brs, int bcs,
                         float* C, float alpha, bool accumulate) {
  for (int e = threadIdx.x; e < M * N; e += blockDim.x) {
    const int m = e / N, n = e - m * N;
    float s = 0.f;
    for (int k = 0; k < K; ++k) s = fmaf(A[m * ars + k * acs], B[k * brs + n * bcs], s);
    C[e] = accumulate ? C[e] + alpha * s : alpha * s;
  }
}

__device__ __forceinline__ float rate_at(const MlpArgs& a, int s, int p) {
  if (a.rate_kind == kRateStep) return a.lr[s];
  if (a.rate_kind == kRatePerParam) return a.lr[(int64_t)s * a.d.P + p];
  int l = 0;
  while (l + 1 < a.d.L && p >= a.d.offW[l + 1]) ++l;
  return a.lr[s * 2 * a.d.L + 2 * l + (p >= a.d.offB[l] ? 1 : 0)];
}

// Forward of `rows` examples x (global) through θ: h_1..h_L into pass buffer H.
__device__ void forward(const MlpArgs& a, int rows, const float* x, const float* theta, float* H) {
  const MlpDims& d = a.d;
  for (int l = 0; l < d.L; ++l) {
    const int I = d.n[l], O = d.n[l + 1];
    const float* in = l == 0 ? x : H + rows * d.cum[l];
    float* out = H + rows * d.cum[l + 1];
    cta_gemm(rows, O, I, in, I, 1, theta + d.offW[l], 1, I, out, 1.f, false);
    __syncthreads();
    const float* b = theta + d.offB[l];
    const bool hidden = l < d.L - 1;
    for (int e = threadIdx.x; e < rows * O; e += blockDim.x) {
      const float z = out[e] + b[e % O];
      out[e] = hidden ? act_fwd(z, a.act, a.slope) : z;
    }
    __syncthreads();
  }
}

// Per-task mean loss of the output rows (returned to every thread) and, if D, the output
// delta into D's last layer. A label outside [0, O) gives NaN, never an out-of-bounds read.
__device__ float loss_delta(const MlpArgs& a, int rows, const float* out, const void* yv, float* D, float* scratch) {
  const int O = a.d.n[a.d.L];
  float acc = 0.f;
  if (a.loss == kMse) {
    const float* y = static_cast<const float*>(yv);
    const float scale = 2.f / static_cast<float>(rows * O);
    for (int e = threadIdx.x; e < rows * O; e += blockDim.x) {
      const float diff = out[e] - y[e];
      acc += diff * diff;
      if (D) D[e] = diff * scale;
    }
    return block_sum(acc, scratch) / static_cast<float>(rows * O);
  }
  const int64_t* y = static_cast<const int64_t*>(yv);
  const float inv = 1.f / static_cast<float>(rows);
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    const float* z = out + r * O;
    const float lse = log_sum_exp(z, static_cast<int64_t>(O));
    const int64_t label = y[r];
    const bool ok = label >= 0 && label < O;
    acc += ok ? lse - z[label] : NAN;
    if (D)
      for (int j = 0; j < O; ++j) D[r * O + j] = ok ? (expf(z[j] - lse) - (j == label ? 1.f : 0.f)) * inv : NAN;
  }
  return block_sum(acc, scratch) * inv;
}

// Backward from the output delta: every δ_l (into D), e_l = δ_l·W_l (into E) and the
// gradient g (flat layout).
__device__ void backward(const MlpArgs& a, int rows, const float* x, const float* theta, const float* H, float* D,
                         float* E, float* g) {
  const MlpDims& d = a.d;
  for (int l = d.L - 1; l >= 0; --l) {
    const int I = d.n[l], O = d.n[l + 1];
    const float* dl = D + rows * d.cum[l + 1];
    const float* hl = l == 0 ? x : H + rows * d.cum[l];
    cta_gemm(O, I, rows, dl, 1, O, hl, I, 1, g + d.offW[l], 1.f, false);  // δᵀh
    for (int o = threadIdx.x; o < O; o += blockDim.x) {
      float s = 0.f;
      for (int r = 0; r < rows; ++r) s += dl[r * O + o];
      g[d.offB[l] + o] = s;
    }
    if (l == 0) break;
    float* el = E + rows * d.cum[l];
    cta_gemm(rows, I, O, dl, O, 1, theta + d.offW[l], I, 1, el, 1.f, false);  // δ·W
    __syncthreads();
    float* dp = D + rows * d.cum[l];
    for (int e = threadIdx.x; e < rows * I; e += blockDim.x) dp[e] = el[e] * act_d1(hl[e], a.act, a.slope);
    __syncthreads();
  }
  __syncthreads();
}

// v −= H_s·u: the Hessian of the support loss at θ_s times u, by the R-operator.
__device__ void hessian_vector(const MlpArgs& a, const float* x, const void* y, const float* theta, const float* H,
                               const float* D, const float* E, const float* u, float* v, float* RZ, float* RH,
                               float* RD0, float* RD1, float* RE, float* scratch) {
  const MlpDims& d = a.d;
  const int K = a.K;
  // Tangent forward: Rz_l = h_l·V_lᵀ + Rh_l·W_lᵀ + c_l;  Rh_{l+1} = f'(h_{l+1}) ⊙ Rz_l.
  for (int l = 0; l < d.L; ++l) {
    const int I = d.n[l], O = d.n[l + 1];
    const float* hl = l == 0 ? x : H + K * d.cum[l];
    float* rz = RZ + K * d.cum[l + 1];
    cta_gemm(K, O, I, hl, I, 1, u + d.offW[l], 1, I, rz, 1.f, false);
    if (l > 0) {
      // Same output elements, same thread: no sync needed between the two products.
      cta_gemm(K, O, I, RH + K * d.cum[l], I, 1, theta + d.offW[l], 1, I, rz, 1.f, true);
    }
    __syncthreads();
    const float* c = u + d.offB[l];
    const float* hn = H + K * d.cum[l + 1];
    float* rh = RH + K * d.cum[l + 1];
    for (int e = threadIdx.x; e < K * O; e += blockDim.x) {
      rz[e] += c[e % O];
      if (l < d.L - 1) rh[e] = act_d1(hn[e], a.act, a.slope) * rz[e];
    }
    __syncthreads();
  }
  // The loss's Hessian at the output.
  const int O = d.n[d.L];
  const float* rzo = RZ + K * d.cum[d.L];
  float* rd = RD0;
  if (a.loss == kMse) {
    const float scale = 2.f / static_cast<float>(K * O);
    for (int e = threadIdx.x; e < K * O; e += blockDim.x) rd[e] = rzo[e] * scale;
  } else {
    const float* out = H + K * d.cum[d.L];
    const float inv = 1.f / static_cast<float>(K);
    for (int r = threadIdx.x; r < K; r += blockDim.x) {
      const float* z = out + r * O;
      const float lse = log_sum_exp(z, static_cast<int64_t>(O));
      float dot = 0.f;
      for (int j = 0; j < O; ++j) dot += expf(z[j] - lse) * rzo[r * O + j];
      for (int j = 0; j < O; ++j) rd[r * O + j] = expf(z[j] - lse) * (rzo[r * O + j] - dot) * inv;
    }
  }
  __syncthreads();
  // Tangent backward, subtracting from v as it goes.
  for (int l = d.L - 1; l >= 0; --l) {
    const int I = d.n[l], Ol = d.n[l + 1];
    const float* hl = l == 0 ? x : H + K * d.cum[l];
    const float* dl = D + K * d.cum[l + 1];
    cta_gemm(Ol, I, K, rd, 1, Ol, hl, I, 1, v + d.offW[l], -1.f, true);
    if (l > 0) cta_gemm(Ol, I, K, dl, 1, Ol, RH + K * d.cum[l], I, 1, v + d.offW[l], -1.f, true);
    for (int o = threadIdx.x; o < Ol; o += blockDim.x) {
      float s = 0.f;
      for (int r = 0; r < K; ++r) s += rd[r * Ol + o];
      v[d.offB[l] + o] -= s;
    }
    if (l == 0) break;
    cta_gemm(K, I, Ol, rd, Ol, 1, theta + d.offW[l], I, 1, RE, 1.f, false);
    cta_gemm(K, I, Ol, dl, Ol, 1, u + d.offW[l], I, 1, RE, 1.f, true);
    __syncthreads();
    float* rdn = rd == RD0 ? RD1 : RD0;
    const float* el = E + K * d.cum[l];
    const float* rzp = RZ + K * d.cum[l];
    for (int e = threadIdx.x; e < K * I; e += blockDim.x)
      rdn[e] = RE[e] * act_d1(hl[e], a.act, a.slope) + el[e] * act_d2(hl[e], a.act) * rzp[e];
    __syncthreads();
    rd = rdn;
  }
  __syncthreads();
}

__global__ void __launch_bounds__(kThreads) mlp_meta_step_kernel(MlpArgs a) {
  extern __shared__ float smem[];
  const MlpDims& d = a.d;
  const int t = blockIdx.x, S = a.steps, K = a.K, Q = a.Q, P = d.P;
  const int pass_k = K * (2 * d.Hs + d.Es), pass_q = Q * (2 * d.Hs + d.Es);
  float* thetas = smem;                         // θ_1..θ_S
  float* grads = thetas + S * P;                // g_0..g_{S−1}
  float* passes = grads + S * P;                // S support passes
  float* qpass = passes + S * pass_k;           // the query pass
  float* u = qpass + pass_q;
  float* v = u + P;
  float* RZ = v + P;
  float* RH = RZ + K * d.Hs;
  float* RD0 = RH + K * d.Hs;
  float* RD1 = RD0 + K * d.nmax;
  float* RE = RD1 + K * d.nmax;
  float* scratch = RE + K * d.nmax;
  auto theta_at = [&](int s) -> const float* { return s == 0 ? a.theta : thetas + (s - 1) * P; };
  const float* sx = a.sx + (int64_t)t * K * d.n[0];
  const float* qx = a.qx + (int64_t)t * Q * d.n[0];
  const bool mse = a.loss == kMse;
  const int O = d.n[d.L];
  const void* sy = mse ? static_cast<const void*>(static_cast<const float*>(a.sy) + (int64_t)t * K * O)
                       : static_cast<const void*>(static_cast<const int64_t*>(a.sy) + (int64_t)t * K);
  const void* qy = mse ? static_cast<const void*>(static_cast<const float*>(a.qy) + (int64_t)t * Q * O)
                       : static_cast<const void*>(static_cast<const int64_t*>(a.qy) + (int64_t)t * Q);
  // ---- inner loop on the support set
  for (int s = 0; s < S; ++s) {
    float* H = passes + s * pass_k;
    float* D = H + K * d.Hs;
    float* E = D + K * d.Hs;
    const float* th = theta_at(s);
    forward(a, K, sx, th, H);
    loss_delta(a, K, H + K * d.cum[d.L], sy, D + K * d.cum[d.L], scratch);
    __syncthreads();
    float* g = grads + s * P;
    backward(a, K, sx, th, H, D, E, g);
    float* next = thetas + s * P;
    for (int p = threadIdx.x; p < P; p += blockDim.x) next[p] = th[p] - rate_at(a, s, p) * g[p];
    __syncthreads();
  }
  // ---- query loss at θ_S (and its gradient v)
  const float* thS = theta_at(S);
  float* Hq = qpass;
  float* Dq = Hq + Q * d.Hs;
  float* Eq = Dq + Q * d.Hs;
  forward(a, Q, qx, thS, Hq);
  const float* out = Hq + Q * d.cum[d.L];
  for (int e = threadIdx.x; e < Q * O; e += blockDim.x) a.preds[(int64_t)t * Q * O + e] = out[e];
  const float loss = loss_delta(a, Q, out, qy, a.grads ? Dq + Q * d.cum[d.L] : nullptr, scratch);
  if (threadIdx.x == 0) a.losses[t] = loss;
  if (!a.grads) return;
  __syncthreads();
  backward(a, Q, qx, thS, Hq, Dq, Eq, v);
  // ---- back through the inner steps
  float* glr = a.glr + (int64_t)t * a.lr_per_task;
  for (int s = S - 1; s >= 0; --s) {
    const float* g = grads + s * P;
    // dα_s = −v ⊙ g_s, reduced to the rate's shape.
    if (a.rate_kind == kRatePerParam) {
      for (int p = threadIdx.x; p < P; p += blockDim.x) glr[(int64_t)s * P + p] = -v[p] * g[p];
    } else if (a.rate_kind == kRateStep) {
      float acc = 0.f;
      for (int p = threadIdx.x; p < P; p += blockDim.x) acc -= v[p] * g[p];
      acc = block_sum(acc, scratch);
      if (threadIdx.x == 0) glr[s] = acc;
    } else {
      for (int seg = 0; seg < 2 * d.L; ++seg) {
        const int l = seg / 2;
        const int lo = seg % 2 == 0 ? d.offW[l] : d.offB[l];
        const int hi = seg % 2 == 0 ? d.offB[l] : d.offB[l] + d.n[l + 1];
        float acc = 0.f;
        for (int p = lo + threadIdx.x; p < hi; p += blockDim.x) acc -= v[p] * g[p];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) glr[s * 2 * d.L + seg] = acc;
      }
    }
    __syncthreads();
    if (a.first_order) continue;
    for (int p = threadIdx.x; p < P; p += blockDim.x) u[p] = rate_at(a, s, p) * v[p];
    __syncthreads();
    float* H = passes + s * pass_k;
    hessian_vector(a, sx, sy, theta_at(s), H, H + K * d.Hs, H + 2 * K * d.Hs, u, v, RZ, RH, RD0, RD1, RE, scratch);
  }
  for (int p = threadIdx.x; p < P; p += blockDim.x) a.gtheta[(int64_t)t * P + p] = v[p];
}

}  // namespace

cudaError_t launch_mlp_meta_step(const MlpArgs& a, int64_t tasks, int64_t smem_bytes, cudaStream_t stream) {
  if (smem_bytes > 48 * 1024) {
    // Above 48 KiB a kernel must opt in to its dynamic shared memory.
    const cudaError_t err = cudaFuncSetAttribute(mlp_meta_step_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem_bytes));
    if (err != cudaSuccess) return err;
  }
  mlp_meta_step_kernel<<<static_cast<unsigned>(tasks), kThreads, smem_bytes, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastmeta
