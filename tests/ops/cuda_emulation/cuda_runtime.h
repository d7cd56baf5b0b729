// A CPU stand-in for the CUDA runtime, so that the kernels in csrc/cuda/*.cu can run on a
// machine without a GPU (tests/ops/test_cuda_emulated.py). It checks their LOGIC —
// indexing, shared-memory layout, the order of the R-operator passes — against the CPU
// kernels; it says nothing about races, occupancy or speed, which only a GPU run
// (bench/gpu_check.py, compute-sanitizer) covers.
//
// Model: blocks run one after another; a block's threads are OS threads; __syncthreads is
// a std::barrier over the block, a warp shuffle a barrier over its 32 threads plus a
// shared array. `__shared__` variables become statics (one copy, as on a GPU block, since
// blocks do not overlap) and the dynamic shared memory one static array. The test rewrites
// `extern __shared__` declarations and `<<<...>>>` launches before compiling.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>
#include <mutex>
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline std::barrier<>* emu_block_barrier;
inline std::vector<std::barrier<>*> emu_warp_barriers;
inline float emu_shfl[4096];
inline float emu_dynamic_smem[1 << 22];
inline std::mutex emu_atomic_mutex;
typedef void* cudaStream_t;
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
template <class F> inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
inline cudaError_t cudaGetLastError() { return 0; }
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(x)
#define __shared__ static
inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
inline float __shfl_down_sync(unsigned, float v, int o) {
  int i = threadIdx.x, w = i / 32, lane = i % 32;
  emu_warp_barriers[w]->arrive_and_wait();
  emu_shfl[i] = v;
  emu_warp_barriers[w]->arrive_and_wait();
  float r = lane + o < 32 ? emu_shfl[i + o] : v;
  emu_warp_barriers[w]->arrive_and_wait();
  return r;
}
inline float atomicAdd(float* p, float v) { std::lock_guard<std::mutex> g(emu_atomic_mutex); float o = *p; *p += v; return o; }
inline void emu_launch(dim3 grid, dim3 block, std::function<void()> fn) {
  gridDim = grid; blockDim = block;
  const unsigned n = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz) for (unsigned by = 0; by < grid.y; ++by) for (unsigned bx = 0; bx < grid.x; ++bx) {
    std::barrier<> bar(n);
    emu_block_barrier = &bar;
    std::vector<std::barrier<>*> wb;
    for (unsigned w = 0; w < (n + 31) / 32; ++w) wb.push_back(new std::barrier<>(std::min(32u, n - 32 * w)));
    emu_warp_barriers = wb;
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < n; ++t) ts.emplace_back([&, t] { threadIdx = dim3(t % block.x, t / block.x, 0); blockIdx = dim3(bx, by, bz); fn(); });
    for (auto& th : ts) th.join();
    for (auto* b : wb) delete b;
  }
}
