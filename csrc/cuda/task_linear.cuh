// The task_linear family on CUDA: the batched GEMM's interface between task_linear.cu and
// task_linear_host.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmeta {
namespace cuda {

struct Strided {
  const float* p;
  int64_t b, r, c;  // batch, row, column strides
};

// One batched GEMM: C[b] = act(A[b]·B[b] + bias[b]) for every batch b; C[b] = A[b]·B[b] +
// addend[b] where addend is given (laid out as C; bias null, act none: the backward's
// gradient addends, in the epilogue); C[b] = A[b]·B[b] + A2[b]·B2[b] where K2 > 0 (bias
// null, act none: the double backward's d grad_out = g_dx·wᵀ + x·g_dwᵀ as one GEMM over
// both terms' K, in one accumulator). A.p null: A is a matrix of ones (the bias's gradient,
// 1ᵀ·grad_out). K = 0: C = bias (+ addend) alone (the double backward's d grad_out when only
// the bias gradient's upstream g_db reached it).
struct Gemm {
  int64_t batches, M, N, K;
  Strided A, B;
  float* C;
  const float* bias;
  int64_t bias_b;
  int act;
  float slope;
  const float* addend;
  int64_t K2;
  Strided A2, B2;
};

// Up to kMaxGemms independent batched GEMMs in one launch (the backward's dx and dw; the
// double backward's d grad_out, d x and d w): grid z covers the first's batches, then the
// second's, ...; x and y the largest of theirs. A block past its own GEMM's tiles returns
// at once, before any barrier.
constexpr int kMaxGemms = 3;
void launch_batched_gemms(const Gemm* gemms, int count, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmeta
