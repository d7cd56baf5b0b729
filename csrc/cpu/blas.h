// A direct BLAS GEMM for the CPU kernels above the tiny-matrix size: the Fortran
// sgemm_/dgemm_ that torch itself calls (ATen/native/CPUBlas.cpp), through no dispatch.
//
// Why not at::native::cpublas::gemm: its float/double overloads are not exported from
// libtorch_cpu (only the fallback gemm_stub is), so an extension cannot link them. The BLAS
// torch is built with (MKL on x86-64 wheels, OpenBLAS elsewhere) exports sgemm_/dgemm_ from
// libtorch_cpu, which the extension links. The declarations are weak: on a torch built
// without BLAS they resolve to null, blas_available() is false and the callers keep the
// hand-written micro-kernel (gemm.h). LP64 integers, as torch's own declarations.
//
// Inside at::parallel_for (one OpenMP thread per task), MKL and OpenBLAS see the nested
// region and run each call on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <cstdint>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL's grouped batch (one group here): what torch's bmm calls on the CPU. Absent from
// other BLAS libraries: the callers then loop over the batch with sgemm_/dgemm_.
void sgemm_batch_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                  const float* alpha, const float** a, const int* lda, const float** b, const int* ldb,
                  const float* beta, float** c, const int* ldc, const int* group_count, const int* group_size)
    __attribute__((weak));
void dgemm_batch_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                  const double* alpha, const double** a, const int* lda, const double** b, const int* ldb,
                  const double* beta, double** c, const int* ldc, const int* group_count, const int* group_size)
    __attribute__((weak));
}

namespace fastmeta {
namespace cpu {

// Multiply-adds per GEMM from which the kernels call BLAS instead of the micro-kernel.
// Below it BLAS's per-call cost (argument checks, packing) outweighs the arithmetic. On the
// project's 2-core Xeon (docs/benchmarks.md, "Measurements behind code decisions"):
// - the input and weight gradients: the micro-kernel wins OFC's head (5×64×5 per task,
//   1 600 multiply-adds) and loses from OFC's 64-64 layer (20 480) up: 4 096;
// - the forward's micro-kernel also transposes w and takes the scalar column tail when
//   O < 8: BLAS wins OFC's head and W2's (6 400), the micro-kernel W2S's head (800): 1 024.
constexpr int64_t kBlasMinMacs = 4096;
constexpr int64_t kBlasMinMacsForward = 1024;

template <typename T>
inline bool blas_available();
template <>
inline bool blas_available<float>() { return sgemm_ != nullptr; }
template <>
inline bool blas_available<double>() { return dgemm_ != nullptr; }

// Whether a GEMM of m·n·k multiply-adds (each dimension within BLAS's int) goes to BLAS:
// BLAS is there and the GEMM has at least min_macs multiply-adds.
template <typename T>
inline bool use_blas(int64_t m, int64_t n, int64_t k, int64_t min_macs = kBlasMinMacs) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  return blas_available<T>() && m * n * k >= min_macs && m <= kMax && n <= kMax && k <= kMax;
}

// Column-major C[m,n] = op(A)[m,k] · op(B)[k,n] (+ C if accumulate), Fortran BLAS conventions
// ('N' or 'T' per operand). A row-major product is the column-major one of the transposes:
// the callers write it out at each call site.
template <typename T>
inline void blas_gemm(char transa, char transb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                      const T* b, int64_t ldb, T* c, int64_t ldc, bool accumulate) {
  int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
  int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = static_cast<int>(ldc);
  T alpha = T(1), beta = accumulate ? T(1) : T(0);
  if constexpr (sizeof(T) == 4)
    sgemm_(&transa, &transb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
  else
    dgemm_(&transa, &transb, &m_, &n_, &k_, &alpha, a, &lda_, b, &ldb_, &beta, c, &ldc_);
}

// The same GEMM (+ C if accumulate) for each of `batch` problems, operand i at a + i·stride_a (strides in
// elements; 0 for an operand shared by all), through MKL's batch call where it exists (one
// call: ~2 µs less than a call per problem at W2's head), else one BLAS call per problem,
// spread over the OpenMP threads.
template <typename T>
inline void blas_gemm_batched(char transa, char transb, int64_t batch, int64_t m, int64_t n, int64_t k, const T* a,
                              int64_t stride_a, int64_t lda, const T* b, int64_t stride_b, int64_t ldb, T* c,
                              int64_t stride_c, int64_t ldc, bool accumulate = false) {
  constexpr bool is_float = sizeof(T) == 4;
  const bool batched = is_float ? sgemm_batch_ != nullptr : dgemm_batch_ != nullptr;
  if (batched && batch <= std::numeric_limits<int>::max()) {
    std::vector<const T*> as(batch), bs(batch);
    std::vector<T*> cs(batch);
    for (int64_t i = 0; i < batch; ++i) {
      as[i] = a + i * stride_a;
      bs[i] = b + i * stride_b;
      cs[i] = c + i * stride_c;
    }
    const int m_ = static_cast<int>(m), n_ = static_cast<int>(n), k_ = static_cast<int>(k);
    const int lda_ = static_cast<int>(lda), ldb_ = static_cast<int>(ldb), ldc_ = static_cast<int>(ldc);
    const int groups = 1, size = static_cast<int>(batch);
    const T alpha = T(1), beta = accumulate ? T(1) : T(0);
    if constexpr (is_float)
      sgemm_batch_(&transa, &transb, &m_, &n_, &k_, &alpha, as.data(), &lda_, bs.data(), &ldb_, &beta, cs.data(),
                   &ldc_, &groups, &size);
    else
      dgemm_batch_(&transa, &transb, &m_, &n_, &k_, &alpha, as.data(), &lda_, bs.data(), &ldb_, &beta, cs.data(),
                   &ldc_, &groups, &size);
    return;
  }
  at::parallel_for(0, batch, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      blas_gemm<T>(transa, transb, m, n, k, a + i * stride_a, lda, b + i * stride_b, ldb, c + i * stride_c, ldc,
                   accumulate);
  });
}

}  // namespace cpu
}  // namespace fastmeta
