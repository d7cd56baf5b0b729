// The fused small-MLP meta-step on the CPU: for every task, the inner loop, the query
// loss and (optionally) the exact meta-gradient w.r.t. θ and the inner rates, in one call.
//
// Model: Linear(n0→n1), act, Linear(n1→n2), act, ..., Linear(→nL); θ is the flat buffer
// W0 [n1,n0], b0 [n1], W1 [n2,n1], b1, ... (named_parameters order).
//
// Per task t (one OpenMP work item, single-threaded inside):
//   θ_0 = θ;  θ_{s+1} = θ_s − α_s ⊙ g_s,  g_s = ∇L_support(θ_s)          (forward + backward)
//   v_S = ∇L_query(θ_S)                                                  (forward + backward)
//   for s = S−1 … 0:  dα_s = −v_{s+1} ⊙ g_s;  v_s = v_{s+1} − H_s (α_s ⊙ v_{s+1})
//   dL_query/dθ = v_0 (first order: the H_s term is dropped, v_s = v_S).
// H_s u is the Hessian of the support loss at θ_s times u, by Pearlmutter's R-operator:
// one forward pass of tangents (Rz = Rh·Wᵀ + h·Vᵀ + c) and one backward pass
// (R dW = Rδᵀh + δᵀRh, R e = Rδ·W + δ·V, Rδ_{l−1} = Re ⊙ f'(z) + e ⊙ f''(z) ⊙ Rz), reusing
// the activations and deltas stored by the inner step's own forward and backward. Cost
// per task and step: about 3× one forward+backward, with no autograd graph.
//
// Layout: every row of every matrix (weights, activations, deltas) is padded with zeros
// to a multiple of 8 elements (the GEMM's register tile is 8 wide), so every product runs
// full tiles; zeros propagate through the padding (act(0) = 0 for every activation here,
// f'(0)·0 = 0), which keeps the pads zero without masking.
// W1 (1-40-40-1, K=10): padded widths 8-40-40-8, ≈ 40 KiB of workspace per thread.
// Bound: FLOPs, in L1/L2: ≈ 12 GEMMs of 10×40×40 per task and step. Measured for W1's 25
// tasks (forward + meta-gradient, one call): 209 µs on one thread, 123 µs on two
// (≈ 8 µs per task; the GEMMs run at ~12 multiply-adds per cycle).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "../common.h"
#include "../mlp_meta_step_entry.h"
#include "../log_sum_exp.h"
#include "cpu_common.h"
#include "gemm.h"

namespace fastmeta {
namespace cpu {
namespace {


constexpr int64_t kPad = 8;  // a multiple of the GEMM tile width Tile<T>::NR (8)

inline int64_t pad(int64_t n) { return (n + kPad - 1) / kPad * kPad; }

// Which rate each inner step applies: one per step, one per parameter tensor, one per
// parameter.
enum class RateKind { Step, Tensor, Param };

struct Plan {
  int64_t L;                      // layers
  std::vector<int64_t> n, np;     // widths n[0..L] and padded widths
  std::vector<int64_t> offW, offB, flatW, flatB, offWT, offH, offD;
  int64_t PP = 0, P = 0, PT = 0;  // padded params, flat params, padded Wᵀ
  int64_t H = 0, D = 0;           // activations and deltas per row (padded, all layers)
  int64_t R = 0;                  // rows: max(K, Q)

  Plan(at::IntArrayRef sizes, int64_t rows) : L(static_cast<int64_t>(sizes.size()) - 1), R(rows) {
    for (auto s : sizes) {
      n.push_back(s);
      np.push_back(pad(s));
    }
    for (int64_t l = 0; l < L; ++l) {
      flatW.push_back(P);
      P += n[l + 1] * n[l];
      flatB.push_back(P);
      P += n[l + 1];
      offW.push_back(PP);
      PP += n[l + 1] * np[l];
      offB.push_back(PP);
      PP += np[l + 1];
      offWT.push_back(PT);
      PT += n[l] * np[l + 1];
    }
    for (int64_t l = 0; l <= L; ++l) {
      offH.push_back(H);
      H += R * np[l];
    }
    for (int64_t l = 0; l < L; ++l) {
      offD.push_back(D);
      D += R * np[l + 1];
    }
  }
};

// The activation is a template argument: with it known at compile time the element-wise
// loops (bias + act, f'(h)·e, ...) vectorise; with a runtime switch per element they
// cost as much as the GEMMs (measured: 35% of W1's time, perf).
template <typename T, Act A>
struct Ctx {
  using scalar = T;
  static constexpr Act act = A;
  const Plan& p;
  T slope;
  LossKind loss;
};

template <typename T>
inline T d_act(T y, Act act, T slope) { return act_derivative_from_output<T>(y, act, slope); }

// f''(z) written in y = f(z); zero for the piecewise-linear activations.
template <typename T>
inline T d2_act(T y, Act act) {
  if (act == Act::Tanh) return T(-2) * y * (T(1) - y * y);
  if (act == Act::Sigmoid) return y * (T(1) - y) * (T(1) - T(2) * y);
  return T(0);
}

// One 8×8 block of a transpose: dst[i][o] = src[o][i].
template <typename T>
inline void transpose_block(const T* src, int64_t lds, T* dst, int64_t ldd, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < cols; ++i)
    for (int64_t o = 0; o < rows; ++o) dst[i * ldd + o] = src[o * lds + i];
}

#ifdef __AVX__
// The full float block in registers: 8 loads, 24 shuffles, 8 stores (the textbook
// unpack/shuffle/permute2f128 sequence) instead of 64 scalar moves with strided stores.
inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int k = 0; k < 8; ++k) r[k] = _mm256_loadu_ps(src + k * lds);
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {
    r[4 * k + 0] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    _mm256_storeu_ps(dst + k * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    _mm256_storeu_ps(dst + (k + 4) * ldd, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}
#endif

// Wᵀ of every layer of θ (padded layout) into wt, in 8×8 blocks. The plain double loop
// (one side strided) cost 1.1 µs for W1's 40×40, as much as one of its GEMMs.
template <typename T>
void transpose_weights(const Plan& p, const T* theta, T* wt) {
  constexpr int64_t B = 8;
  for (int64_t l = 0; l < p.L; ++l) {
    const T* w = theta + p.offW[l];
    T* d = wt + p.offWT[l];
    const int64_t O = p.n[l + 1], I = p.n[l], ldw = p.np[l], ldd = p.np[l + 1];
    for (int64_t o0 = 0; o0 < O; o0 += B)
      for (int64_t i0 = 0; i0 < I; i0 += B) {
        const int64_t ob = std::min(B, O - o0), ib = std::min(B, I - i0);
        const T* src = w + o0 * ldw + i0;
        T* dst = d + i0 * ldd + o0;
#ifdef __AVX__
        if constexpr (std::is_same_v<T, float>) {
          if (ob == B && ib == B) {
            transpose8x8(src, ldw, dst, ldd);
            continue;
          }
        }
#endif
        transpose_block<T>(src, ldw, dst, ldd, ob, ib);
      }
  }
}

// Forward of `rows` examples: h (all layers, h_0 = x already in place) from θ and Wᵀ.
template <typename T, typename C>
void forward(const C& c, int64_t rows, const T* theta, const T* wt, T* h) {
  const Plan& p = c.p;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t ow = p.np[l + 1];
    T* out = h + p.offH[l + 1];
    gemm<T>(rows, ow, p.n[l], h + p.offH[l], p.np[l], 1, wt + p.offWT[l], ow, out, ow, false);
    const T* b = theta + p.offB[l];
    const bool hidden = l < p.L - 1;
    for (int64_t r = 0; r < rows; ++r) {
      T* row = out + r * ow;
#pragma omp simd
      for (int64_t j = 0; j < ow; ++j) row[j] += b[j];
      if (hidden && C::act != Act::None)
        for (int64_t j = 0; j < ow; ++j) row[j] = act_forward<T>(row[j], C::act, c.slope);
    }
  }
}

// Mean loss of the output rows against y, and (if delta) its gradient at the output.
template <typename T, typename Y, typename C>
T loss_and_delta(const C& c, int64_t rows, const T* out, const Y* y, T* delta) {
  const Plan& p = c.p;
  const int64_t O = p.n[p.L], ow = p.np[p.L];
  T total = 0;
  if (c.loss == LossKind::Mse) {
    const T scale = T(2) / T(rows * O);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < O; ++j) {
        const T d = out[r * ow + j] - T(y[r * O + j]);
        total += d * d;
        if (delta) delta[r * ow + j] = d * scale;
      }
    return total / T(rows * O);
  }
  const T inv = T(1) / T(rows);
  for (int64_t r = 0; r < rows; ++r) {
    const T* z = out + r * ow;
    const T lse = log_sum_exp(z, O);
    const int64_t label = static_cast<int64_t>(y[r]);
    total += lse - z[label];
    if (delta) {
      for (int64_t j = 0; j < O; ++j) delta[r * ow + j] = std::exp(z[j] - lse) * inv;
      delta[r * ow + label] -= inv;
    }
  }
  return total * inv;
}

// Backward from the output delta (in d + offD[L−1]): every layer's delta, e = δ·W (in e,
// laid out like h) and the gradient g (padded layout).
template <typename T, typename C>
void backward(const C& c, int64_t rows, const T* theta, const T* h, T* d, T* e, T* g) {
  const Plan& p = c.p;
  for (int64_t l = p.L - 1; l >= 0; --l) {
    const int64_t ow = p.np[l + 1], iw = p.np[l];
    const T* dl = d + p.offD[l];
    // dW = δᵀ h: δᵀ read in place (row o of δᵀ is column o of δ).
    gemm<T>(p.n[l + 1], iw, rows, dl, 1, ow, h + p.offH[l], iw, g + p.offW[l], iw, false);
    T* gb = g + p.offB[l];
    for (int64_t j = 0; j < ow; ++j) gb[j] = 0;
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < ow; ++j) gb[j] += dl[r * ow + j];
    }
    if (l == 0) break;  // no gradient w.r.t. the input x
    T* el = e + p.offH[l];
    gemm<T>(rows, iw, p.n[l + 1], dl, ow, 1, theta + p.offW[l], iw, el, iw, false);
    const T* hl = h + p.offH[l];
    T* dprev = d + p.offD[l - 1];
    for (int64_t k = 0; k < rows * iw; ++k) dprev[k] = el[k] * d_act<T>(hl[k], C::act, c.slope);
  }
}

// Per-thread workspace. Zero-initialised once: the row pads are never written with
// anything but zeros afterwards (see the header comment).
template <typename T>
struct Workspace {
  int64_t S;
  std::vector<T> theta, wt, g, h, d, e;   // per step: θ_s, Wᵀ_s, g_s, support h, δ, e
  std::vector<T> hq, dq, eq, v, u, hu, vt, rz, rh, rd, re, dalpha;

  Workspace(const Plan& p, int64_t steps) : S(steps) {
    theta.assign((S + 1) * p.PP, T(0));
    wt.assign((S + 1) * p.PT, T(0));
    g.assign(std::max<int64_t>(S, 1) * p.PP, T(0));
    h.assign(std::max<int64_t>(S, 1) * p.H, T(0));
    d.assign(std::max<int64_t>(S, 1) * p.D, T(0));
    e.assign(std::max<int64_t>(S, 1) * p.H, T(0));
    hq.assign(p.H, T(0));
    dq.assign(p.D, T(0));
    eq.assign(p.H, T(0));
    for (auto* b : {&v, &u, &hu, &dalpha}) b->assign(p.PP, T(0));
    vt.assign(p.PT, T(0));
    rz.assign(p.D, T(0));
    rh.assign(p.H, T(0));
    rd.assign(p.D, T(0));
    re.assign(p.H, T(0));
  }
};

// hu = H u: the Hessian of the support loss at step s times u (padded layout).
template <typename T, typename Y, typename C>
void hessian_vector(const C& c, Workspace<T>& w, int64_t s, int64_t rows, const Y* y) {
  const Plan& p = c.p;
  const T* theta = w.theta.data() + s * p.PP;
  const T* wt = w.wt.data() + s * p.PT;
  const T* h = w.h.data() + s * p.H;
  const T* d = w.d.data() + s * p.D;
  const T* e = w.e.data() + s * p.H;
  const T* u = w.u.data();
  T* vt = w.vt.data();
  transpose_weights<T>(p, u, vt);
  // Tangent forward: Rz_l = Rh_l·W_lᵀ + h_l·V_lᵀ + c_l;  Rh_{l+1} = f'(z_l) ⊙ Rz_l.
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t ow = p.np[l + 1], iw = p.np[l];
    T* rz = w.rz.data() + p.offD[l];
    gemm<T>(rows, ow, p.n[l], h + p.offH[l], iw, 1, vt + p.offWT[l], ow, rz, ow, false);
    if (l > 0) gemm<T>(rows, ow, p.n[l], w.rh.data() + p.offH[l], iw, 1, wt + p.offWT[l], ow, rz, ow, true);
    const T* cb = u + p.offB[l];
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < ow; ++j) rz[r * ow + j] += cb[j];
    }
    if (l < p.L - 1) {
      const T* hn = h + p.offH[l + 1];
      T* rh = w.rh.data() + p.offH[l + 1];
      for (int64_t k = 0; k < rows * ow; ++k) rh[k] = d_act<T>(hn[k], C::act, c.slope) * rz[k];
    }
  }
  // The loss's Hessian at the output: 2/(rows·O)·Rz for MSE; per row
  // (p ⊙ Rz − p·⟨p, Rz⟩)/rows for cross-entropy (p = softmax of the output).
  {
    const int64_t O = p.n[p.L], ow = p.np[p.L];
    const T* rz = w.rz.data() + p.offD[p.L - 1];
    T* rd = w.rd.data() + p.offD[p.L - 1];
    if (c.loss == LossKind::Mse) {
      const T scale = T(2) / T(rows * O);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < O; ++j) rd[r * ow + j] = rz[r * ow + j] * scale;
    } else {
      const T inv = T(1) / T(rows);
      const T* out = h + p.offH[p.L];
      for (int64_t r = 0; r < rows; ++r) {
        const T* z = out + r * ow;
        const T lse = log_sum_exp(z, O);
        T dot = 0;
        for (int64_t j = 0; j < O; ++j) dot += std::exp(z[j] - lse) * rz[r * ow + j];
        for (int64_t j = 0; j < O; ++j) rd[r * ow + j] = std::exp(z[j] - lse) * (rz[r * ow + j] - dot) * inv;
      }
    }
  }
  // Tangent backward.
  T* hu = w.hu.data();
  for (int64_t l = p.L - 1; l >= 0; --l) {
    const int64_t ow = p.np[l + 1], iw = p.np[l];
    const T* rd = w.rd.data() + p.offD[l];
    const T* dl = d + p.offD[l];
    gemm<T>(p.n[l + 1], iw, rows, rd, 1, ow, h + p.offH[l], iw, hu + p.offW[l], iw, false);
    if (l > 0) gemm<T>(p.n[l + 1], iw, rows, dl, 1, ow, w.rh.data() + p.offH[l], iw, hu + p.offW[l], iw, true);
    T* hb = hu + p.offB[l];
    for (int64_t j = 0; j < ow; ++j) hb[j] = 0;
    for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
      for (int64_t j = 0; j < ow; ++j) hb[j] += rd[r * ow + j];
    }
    if (l == 0) break;
    T* re = w.re.data();
    gemm<T>(rows, iw, p.n[l + 1], rd, ow, 1, theta + p.offW[l], iw, re, iw, false);
    gemm<T>(rows, iw, p.n[l + 1], dl, ow, 1, u + p.offW[l], iw, re, iw, true);
    const T* hl = h + p.offH[l];
    const T* el = e + p.offH[l];
    const T* rzp = w.rz.data() + p.offD[l - 1];
    T* rdp = w.rd.data() + p.offD[l - 1];
    for (int64_t k = 0; k < rows * iw; ++k)
      rdp[k] = re[k] * d_act<T>(hl[k], C::act, c.slope) + el[k] * d2_act<T>(hl[k], C::act) * rzp[k];
  }
}

struct Args {
  at::Tensor theta, support_x, support_y, query_x, query_y, lr;
  int64_t T, K, Q, steps;
  RateKind rate_kind;
  bool first_order;
  int64_t grads;
};

template <typename T, typename Y, typename C>
void run(const Plan& plan, const C& c, const Args& a, const T* rates, at::Tensor& losses,
         at::Tensor& preds, at::Tensor& gtheta_task, at::Tensor& glr_task) {
  const Plan& p = plan;
  const int64_t S = a.steps, K = a.K, Q = a.Q;
  const int64_t O = p.n[p.L];
  const T* sx = a.support_x.data_ptr<T>();
  const T* qx = a.query_x.data_ptr<T>();
  const Y* sy = a.support_y.data_ptr<Y>();
  const Y* qy = a.query_y.data_ptr<Y>();
  const int64_t ys = c.loss == LossKind::Mse ? O : 1;  // target values per example
  const T* theta_flat = a.theta.data_ptr<T>();
  T* loss_p = losses.data_ptr<T>();
  T* pred_p = preds.data_ptr<T>();
  const bool need_grad = a.grads != 0;
  T* gth = need_grad ? gtheta_task.data_ptr<T>() : nullptr;
  T* glr = need_grad ? glr_task.data_ptr<T>() : nullptr;
  const int64_t lr_per_task = need_grad ? glr_task.numel() / a.T : 0;

  // θ in the padded layout, shared by every task's first step.
  std::vector<T> theta0(p.PP, T(0));
  for (int64_t l = 0; l < p.L; ++l) {
    for (int64_t o = 0; o < p.n[l + 1]; ++o)
      for (int64_t i = 0; i < p.n[l]; ++i)
        theta0[p.offW[l] + o * p.np[l] + i] = theta_flat[p.flatW[l] + o * p.n[l] + i];
    for (int64_t o = 0; o < p.n[l + 1]; ++o) theta0[p.offB[l] + o] = theta_flat[p.flatB[l] + o];
  }

  // Tasks are independent: one work item each; one workspace per thread.
  at::parallel_for(0, a.T, 1, [&](int64_t t0, int64_t t1) {
    Workspace<T> w(p, S);
    std::copy(theta0.begin(), theta0.end(), w.theta.begin());
    transpose_weights<T>(p, w.theta.data(), w.wt.data());
    for (int64_t t = t0; t < t1; ++t) {
      // ---- inner loop on the support set
      for (int64_t s = 0; s < S; ++s) {
        T* h = w.h.data() + s * p.H;
        for (int64_t r = 0; r < K; ++r)
          std::copy(sx + (t * K + r) * p.n[0], sx + (t * K + r + 1) * p.n[0], h + r * p.np[0]);
        const T* th = w.theta.data() + s * p.PP;
        forward<T>(c, K, th, w.wt.data() + s * p.PT, h);
        T* d = w.d.data() + s * p.D;
        loss_and_delta<T, Y>(c, K, h + p.offH[p.L], sy + t * K * ys, d + p.offD[p.L - 1]);
        T* g = w.g.data() + s * p.PP;
        backward<T>(c, K, th, h, d, w.e.data() + s * p.H, g);
        T* next = w.theta.data() + (s + 1) * p.PP;
        const T* rate = rates + s * p.PP;
#pragma omp simd
        for (int64_t k = 0; k < p.PP; ++k) next[k] = th[k] - rate[k] * g[k];
        transpose_weights<T>(p, next, w.wt.data() + (s + 1) * p.PT);
      }
      // ---- query loss (and its gradient) at θ_S
      const T* thS = w.theta.data() + S * p.PP;
      T* hq = w.hq.data();
      for (int64_t r = 0; r < Q; ++r)
        std::copy(qx + (t * Q + r) * p.n[0], qx + (t * Q + r + 1) * p.n[0], hq + r * p.np[0]);
      forward<T>(c, Q, thS, w.wt.data() + S * p.PT, hq);
      const T* out = hq + p.offH[p.L];
      for (int64_t r = 0; r < Q; ++r)
        std::copy(out + r * p.np[p.L], out + r * p.np[p.L] + O, pred_p + (t * Q + r) * O);
      loss_p[t] = loss_and_delta<T, Y>(c, Q, out, qy + t * Q * ys,
                                       need_grad ? w.dq.data() + p.offD[p.L - 1] : nullptr);
      if (!need_grad) continue;
      T* v = w.v.data();
      backward<T>(c, Q, thS, hq, w.dq.data(), w.eq.data(), v);
      // ---- back through the inner steps
      T* glr_t = glr + t * lr_per_task;
      for (int64_t k = 0; k < lr_per_task; ++k) glr_t[k] = 0;
      for (int64_t s = S - 1; s >= 0; --s) {
        const T* g = w.g.data() + s * p.PP;
        const T* rate = rates + s * p.PP;
        T* da = w.dalpha.data();
#pragma omp simd
        for (int64_t k = 0; k < p.PP; ++k) da[k] = -v[k] * g[k];
        // Reduce dα_s (padded) to the rate's own shape.
        // `omp simd reduction` lets the sums reassociate, hence vectorise: a plain float
        // sum over W1's 1.9k parameters is a 4-cycle dependency chain, 2.7 µs per task.
        if (a.rate_kind == RateKind::Step) {
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t k = 0; k < p.PP; ++k) sum += da[k];
          glr_t[s] = sum;
        } else if (a.rate_kind == RateKind::Tensor) {
          for (int64_t l = 0; l < p.L; ++l) {
            T sw = 0, sb = 0;
            const int64_t w0 = p.offW[l], b0 = p.offB[l], b1 = p.offB[l] + p.np[l + 1];
#pragma omp simd reduction(+ : sw)
            for (int64_t k = w0; k < b0; ++k) sw += da[k];
#pragma omp simd reduction(+ : sb)
            for (int64_t k = b0; k < b1; ++k) sb += da[k];
            glr_t[s * 2 * p.L + 2 * l] = sw;
            glr_t[s * 2 * p.L + 2 * l + 1] = sb;
          }
        } else {
          T* dst = glr_t + s * p.P;
          for (int64_t l = 0; l < p.L; ++l) {
            for (int64_t o = 0; o < p.n[l + 1]; ++o)
              for (int64_t i = 0; i < p.n[l]; ++i)
                dst[p.flatW[l] + o * p.n[l] + i] = da[p.offW[l] + o * p.np[l] + i];
            for (int64_t o = 0; o < p.n[l + 1]; ++o) dst[p.flatB[l] + o] = da[p.offB[l] + o];
          }
        }
        if (a.first_order) continue;
        T* u = w.u.data();
#pragma omp simd
        for (int64_t k = 0; k < p.PP; ++k) u[k] = rate[k] * v[k];
        hessian_vector<T, Y>(c, w, s, K, sy + t * K * ys);
        const T* hu = w.hu.data();
#pragma omp simd
        for (int64_t k = 0; k < p.PP; ++k) v[k] -= hu[k];
      }
      T* dst = gth + t * p.P;
      for (int64_t l = 0; l < p.L; ++l) {
        for (int64_t o = 0; o < p.n[l + 1]; ++o)
          for (int64_t i = 0; i < p.n[l]; ++i) dst[p.flatW[l] + o * p.n[l] + i] = v[p.offW[l] + o * p.np[l] + i];
        for (int64_t o = 0; o < p.n[l + 1]; ++o) dst[p.flatB[l] + o] = v[p.offB[l] + o];
      }
    }
  });
}

// The validation the learners do with torch ops elsewhere, here in the kernel's own loops:
// on the CPU it costs no dispatch and no sync. A finding is not thrown: it is written to
// `nonfinite` (kind, task, argument; see NonFinite in mlp_meta_step_entry.h), from which the
// op raises FloatingPointError with the engine's message. The first finding wins.
inline void check_finite_inputs(const at::Tensor& sx, const at::Tensor& sy, const at::Tensor& qx, const at::Tensor& qy,
                                int64_t T, LossKind loss, int64_t* nonfinite) {
  std::vector<std::pair<const at::Tensor*, NonFiniteArgument>> named{{&sx, NonFiniteArgument::SupportX},
                                                                     {&qx, NonFiniteArgument::QueryX}};
  if (loss == LossKind::Mse) {
    named.push_back({&sy, NonFiniteArgument::SupportY});
    named.push_back({&qy, NonFiniteArgument::QueryY});
  }
  for (auto [t, argument] : named) {
    dispatch_floating(t->scalar_type(), "mlp_meta_step check", [&](auto tag_) {
      using scalar_t = decltype(tag_);
      const scalar_t* d = t->data_ptr<scalar_t>();
      const int64_t per_task = t->numel() / T;
      for (int64_t i = 0; i < t->numel() && nonfinite[0] == 0; ++i)
        if (!std::isfinite(d[i])) report_nonfinite(nonfinite, NonFinite::Input, i / per_task, argument);
    });
  }
}

inline void check_finite_losses(const at::Tensor& losses, int64_t* nonfinite) {
  dispatch_floating(losses.scalar_type(), "mlp_meta_step check", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* l = losses.data_ptr<scalar_t>();
    for (int64_t t = 0; t < losses.numel() && nonfinite[0] == 0; ++t)
      if (!std::isfinite(l[t])) report_nonfinite(nonfinite, NonFinite::QueryLoss, t, NonFiniteArgument::None);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_meta_step(
    const at::Tensor& theta, at::IntArrayRef layer_sizes, c10::string_view act_name, double negative_slope,
    const at::Tensor& support_x, const at::Tensor& support_y, const at::Tensor& query_x,
    const at::Tensor& query_y, c10::string_view loss_name, const at::Tensor& lr, int64_t steps,
    bool first_order, int64_t grads, const c10::optional<at::Tensor>& loss_weights, int64_t* nonfinite) {
  // ---- checks: everything the loops below index is validated here
  for (const at::Tensor* t : {&theta, &support_x, &support_y, &query_x, &query_y, &lr}) {
    FM_CHECK_DEVICE(*t, kCPU);
    FM_CHECK_CONTIGUOUS(*t);
  }
  FM_CHECK_FLOATING(theta);
  FM_CHECK_SAME_DTYPE(support_x, theta);
  FM_CHECK_SAME_DTYPE(query_x, theta);
  FM_CHECK_SAME_DTYPE(lr, theta);
  TORCH_CHECK_VALUE(layer_sizes.size() >= 2, "layer_sizes needs at least [in, out], got ", layer_sizes);
  for (auto s : layer_sizes) TORCH_CHECK_VALUE(s >= 1, "layer sizes must be >= 1, got ", layer_sizes);
  TORCH_CHECK_VALUE(steps >= 0, "steps must be >= 0, got ", steps);
  TORCH_CHECK_VALUE(grads >= 0 && grads <= 2, "grads must be 0, 1 or 2, got ", grads);
  const Act act = parse_act(std::string(act_name.data(), act_name.size()));
  // The zero row pads stay zero only if act(0) = 0: not so for the sigmoid (0.5).
  TORCH_CHECK_NOT_IMPLEMENTED(act != Act::Sigmoid, "mlp_meta_step: act must be relu, leaky_relu, tanh or none");
  const LossKind loss = parse_loss(std::string(loss_name.data(), loss_name.size()));
  FM_CHECK_DIM(support_x, 3);
  FM_CHECK_DIM(query_x, 3);
  const int64_t T = support_x.size(0), K = support_x.size(1), Q = query_x.size(1);
  const int64_t L = static_cast<int64_t>(layer_sizes.size()) - 1, O = layer_sizes.back();
  TORCH_CHECK_VALUE(T >= 1 && K >= 1 && Q >= 1, "need at least one task, support and query example");
  TORCH_CHECK_VALUE(support_x.size(2) == layer_sizes[0] && query_x.size(0) == T && query_x.size(2) == layer_sizes[0],
              "support_x [T, K, ", layer_sizes[0], "] and query_x [T, Q, ", layer_sizes[0], "] expected, got ",
              support_x.sizes(), " and ", query_x.sizes());
  Plan plan(layer_sizes, std::max(K, Q));
  FM_CHECK_DIM(theta, 1);
  TORCH_CHECK_VALUE(theta.size(0) == plan.P, "theta must hold ", plan.P, " parameters for layers ", layer_sizes,
              ", got ", theta.size(0));
  if (loss == LossKind::Mse) {
    FM_CHECK_SAME_DTYPE(support_y, theta);
    FM_CHECK_SAME_DTYPE(query_y, theta);
    TORCH_CHECK_VALUE(support_y.dim() == 3 && support_y.size(0) == T && support_y.size(1) == K && support_y.size(2) == O,
                "support_y must be [T, K, O] = [", T, ", ", K, ", ", O, "], got ", support_y.sizes());
    TORCH_CHECK_VALUE(query_y.dim() == 3 && query_y.size(0) == T && query_y.size(1) == Q && query_y.size(2) == O,
                "query_y must be [T, Q, O] = [", T, ", ", Q, ", ", O, "], got ", query_y.sizes());
  } else {
    for (const at::Tensor* y : {&support_y, &query_y}) {
      TORCH_CHECK_TYPE(y->scalar_type() == at::kLong, "cross-entropy labels must be int64, got ", y->scalar_type());
      const int64_t* d = y->data_ptr<int64_t>();
      const int64_t per_task = y->numel() / std::max<int64_t>(T, 1);
      for (int64_t i = 0; i < y->numel(); ++i)  // a label out of range would read past the row: always checked
        TORCH_CHECK_VALUE(d[i] >= 0 && d[i] < O, y == &support_y ? "support" : "query",
                          " labels out of range for the model's ", O, " outputs (task ", i / per_task,
                          " has label ", d[i], ")");
    }
    TORCH_CHECK_VALUE(support_y.dim() == 2 && support_y.size(0) == T && support_y.size(1) == K,
                "support_y must be [T, K], got ", support_y.sizes());
    TORCH_CHECK_VALUE(query_y.dim() == 2 && query_y.size(0) == T && query_y.size(1) == Q,
                "query_y must be [T, Q], got ", query_y.sizes());
  }
  RateKind kind;
  if (lr.dim() == 1) {
    kind = RateKind::Step;
  } else if (lr.dim() == 2 && lr.size(1) == 2 * L) {
    kind = RateKind::Tensor;
  } else if (lr.dim() == 2 && lr.size(1) == plan.P) {
    kind = RateKind::Param;
  } else {
    TORCH_CHECK_VALUE(false, "lr must be [steps], [steps, ", 2 * L, "] or [steps, ", plan.P, "], got ", lr.sizes());
  }
  TORCH_CHECK_VALUE(lr.size(0) == steps, "lr must have one row per step (", steps, "), got ", lr.sizes());
  if (grads == 1) {
    TORCH_CHECK_VALUE(loss_weights.has_value(), "grads == 1 needs loss_weights");
    FM_CHECK_DEVICE(*loss_weights, kCPU);
    FM_CHECK_CONTIGUOUS(*loss_weights);
    FM_CHECK_SAME_DTYPE(*loss_weights, theta);
    TORCH_CHECK_VALUE(loss_weights->dim() == 1 && loss_weights->size(0) == T, "loss_weights must be [T] = [", T,
                "], got ", loss_weights->sizes());
  }

  if (nonfinite != nullptr) check_finite_inputs(support_x, support_y, query_x, query_y, T, loss, nonfinite);

  at::Tensor losses = at::empty({T}, theta.options());
  at::Tensor preds = at::empty({T, Q, O}, theta.options());
  std::vector<int64_t> lr_task_shape{T};
  for (auto s : lr.sizes()) lr_task_shape.push_back(s);
  at::Tensor gtheta_task = grads ? at::empty({T, plan.P}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor glr_task = grads ? at::empty(lr_task_shape, theta.options()) : at::empty({0}, theta.options());
  Args a{theta, support_x, support_y, query_x, query_y, lr, T, K, Q, steps, kind, first_order, grads};

  dispatch_floating(theta.scalar_type(), "mlp_meta_step", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    using T_ = scalar_t;
    // The rate of every parameter at every step, in the padded layout (pads 0).
    std::vector<T_> rates(std::max<int64_t>(steps, 1) * plan.PP, T_(0));
    const T_* lr_p = lr.data_ptr<T_>();
    for (int64_t s = 0; s < steps; ++s) {
      T_* r = rates.data() + s * plan.PP;
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t o = 0; o < plan.n[l + 1]; ++o) {
          for (int64_t i = 0; i < plan.n[l]; ++i) {
            const int64_t flat = plan.flatW[l] + o * plan.n[l] + i;
            r[plan.offW[l] + o * plan.np[l] + i] =
                kind == RateKind::Step ? lr_p[s] : kind == RateKind::Tensor ? lr_p[s * 2 * L + 2 * l] : lr_p[s * plan.P + flat];
          }
          const int64_t flat = plan.flatB[l] + o;
          r[plan.offB[l] + o] =
              kind == RateKind::Step ? lr_p[s] : kind == RateKind::Tensor ? lr_p[s * 2 * L + 2 * l + 1] : lr_p[s * plan.P + flat];
        }
      }
    }
    auto go = [&](auto ctx) {
      if (loss == LossKind::Mse)
        run<T_, T_>(plan, ctx, a, rates.data(), losses, preds, gtheta_task, glr_task);
      else
        run<T_, int64_t>(plan, ctx, a, rates.data(), losses, preds, gtheta_task, glr_task);
    };
    const T_ slope = static_cast<T_>(negative_slope);
    switch (act) {
      case Act::Relu: go(Ctx<T_, Act::Relu>{plan, slope, loss}); break;
      case Act::LeakyRelu: go(Ctx<T_, Act::LeakyRelu>{plan, slope, loss}); break;
      case Act::Tanh: go(Ctx<T_, Act::Tanh>{plan, slope, loss}); break;
      default: go(Ctx<T_, Act::None>{plan, slope, loss}); break;
    }
  });
  if (nonfinite != nullptr) check_finite_losses(losses, nonfinite);
  if (grads != 1) return {losses, preds, gtheta_task, glr_task};
  // Σ_t w_t · (per-task gradient): a [T]·[T, n] product, in task order (deterministic).
  at::Tensor gtheta = at::empty({plan.P}, theta.options());  // zeroed below: no aten fill of its own
  at::Tensor glr = at::empty(lr.sizes(), theta.options());
  dispatch_floating(theta.scalar_type(), "mlp_meta_step_reduce", [&](auto tag_) {
    using scalar_t = decltype(tag_);
    const scalar_t* wt = loss_weights->data_ptr<scalar_t>();
    for (auto [src, dst] : {std::pair{&gtheta_task, &gtheta}, std::pair{&glr_task, &glr}}) {
      const int64_t n = dst->numel();
      const scalar_t* sp = src->template data_ptr<scalar_t>();
      scalar_t* dp = dst->template data_ptr<scalar_t>();
      for (int64_t k = 0; k < n; ++k) dp[k] = 0;
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t wgt = wt[t];
#pragma omp simd
        for (int64_t k = 0; k < n; ++k) dp[k] += wgt * sp[t * n + k];
      }
    }
  });
  return {losses, preds, gtheta, glr};
}



}  // namespace
}  // namespace cpu
}  // namespace fastmeta

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("mlp_meta_step_with_task_gradients", &fastmeta::mlp_meta_step_with_task_gradients<&fastmeta::cpu::mlp_meta_step>);
  m.impl("mlp_meta_step_backward", &fastmeta::mlp_meta_step_backward<&fastmeta::cpu::mlp_meta_step>);
  m.impl("mlp_meta_step_weigh_task_gradients", &fastmeta::mlp_meta_step_weigh_task_gradients);
  m.impl("mlp_meta_step_update", &fastmeta::mlp_meta_step_update<&fastmeta::cpu::mlp_meta_step>);
}
