// CUDA kernel of the task_linear family: batched GEMMs with a fused bias and activation.
#include <cmath>
#include <cstdint>

#include "common_cuda.cuh"
#include "task_linear.cuh"

namespace fastmeta {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------
// Batched GEMM for the task_linear family (task_linear.cuh, Gemm): C[b] = A[b]·B[b] (+
// bias, activation), + addend[b] (the backward's addends, read in the epilogue: no add
// launch of their own), or + A2[b]·B2[b] (a second term in the same accumulator: the double
// backward's d grad_out in one GEMM), with A and B read through strides, so that x·wᵀ,
// grad·w and gradᵀ·x need no transposed copies and a shared weight is a batch stride of 0.
// A null A is a matrix of ones (the bias's gradient: 1ᵀ·grad, a row of column sums, as one
// more GEMM of the backward's launch).
// 32×32 output tiles, 8 K-slices staged in shared memory, 256 threads × 4 outputs each.
// fp32 FMA throughout (no TF32). One launch runs up to kMaxGemms independent GEMMs (grid
// z: the first's batches, then the second's, ...; a block past its own GEMM's tiles
// returns at once, before any barrier).
// ---------------------------------------------------------------------------------------

constexpr int kTile = 32, kSlice = 8;

struct Gemms {
  Gemm g[kMaxGemms];
  int count;
};

// acc[i] += A[m0 + ty + 8i, :K] · B[:K, n0 + tx] for one term, staged through As and Bs; a
// null a reads as ones.
__device__ void accumulate_term(const float* a, const Strided& A, const float* b, const Strided& B, int64_t M,
                                int64_t N, int64_t K, int64_t m0, int64_t n0, float (*As)[kTile + 1],
                                float (*Bs)[kTile + 1], float* acc) {
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;  // ty in [0, 8)
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
    // Stage A[m0:m0+32, k0:k0+8] and B[k0:k0+8, n0:n0+32]: 256 values each, one per thread.
    {
      const int kk = threadIdx.x % kSlice, mm = threadIdx.x / kSlice;  // mm in [0, 32)
      const int64_t m = m0 + mm, k = k0 + kk;
      As[kk][mm] = (m < M && k < K) ? (a ? a[m * A.r + k * A.c] : 1.f) : 0.f;
      const int64_t n = n0 + tx, kb = k0 + ty;
      Bs[ty][tx] = (n < N && kb < K) ? b[kb * B.r + n * B.c] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSlice; ++kk) {
      const float bv = Bs[kk][tx];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i] = fmaf(As[kk][ty + 8 * i], bv, acc[i]);
    }
    __syncthreads();
  }
}

__global__ void batched_gemm_kernel(Gemms gemms) {
  __shared__ float As[kSlice][kTile + 1];
  __shared__ float Bs[kSlice][kTile + 1];
  int64_t batch = blockIdx.z;
  int which = 0;
  while (which + 1 < gemms.count && batch >= gemms.g[which].batches) batch -= gemms.g[which++].batches;
  const Gemm& g = gemms.g[which];
  const int64_t M = g.M, N = g.N;
  const int64_t m0 = blockIdx.y * (int64_t)kTile, n0 = blockIdx.x * (int64_t)kTile;
  if (m0 >= M || n0 >= N) return;  // the grid is sized for the largest GEMM: uniform per block
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  accumulate_term(g.A.p ? g.A.p + batch * g.A.b : nullptr, g.A, g.B.p + batch * g.B.b, g.B, M, N, g.K, m0, n0, As,
                  Bs, acc);
  if (g.K2 > 0)
    accumulate_term(g.A2.p + batch * g.A2.b, g.A2, g.B2.p + batch * g.B2.b, g.B2, M, N, g.K2, m0, n0, As, Bs, acc);
  const int64_t n = n0 + tx;
  if (n >= N) return;
  const float* __restrict bias = g.bias;
  const float* __restrict addend = g.addend;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 8 * i;
    if (m >= M) continue;
    float v = acc[i];
    if (bias) v += bias[batch * g.bias_b + n];
    const int64_t at = (batch * M + m) * N + n;
    if (addend) v += addend[at];
    g.C[at] = act_fwd(v, g.act, g.slope);
  }
}

}  // namespace

void launch_batched_gemms(const Gemm* gemms, int count, cudaStream_t stream) {
  Gemms all{};
  int64_t M = 0, N = 0, batches = 0;
  for (int i = 0; i < count && i < kMaxGemms; ++i) {
    all.g[i] = gemms[i];
    M = gemms[i].M > M ? gemms[i].M : M;
    N = gemms[i].N > N ? gemms[i].N : N;
    batches += gemms[i].batches;
  }
  all.count = count < kMaxGemms ? count : kMaxGemms;
  const dim3 grid((N + kTile - 1) / kTile, (M + kTile - 1) / kTile, batches);
  batched_gemm_kernel<<<grid, 256, 0, stream>>>(all);
}

}  // namespace cuda
}  // namespace fastmeta
