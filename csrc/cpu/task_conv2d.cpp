// CPU kernels of task_conv2d and its backward ops: per task, im2col + one GEMM, or, for large
// fp32 problems, torch's own oneDNN convolution called per task ("The oneDNN route" below).
//
//   forward       Y_t [O, n·L]  = W_t [O, K] · cols [K, n·L]
//   input-grad    dcols [K, n·L] = W_tᵀ [K, O] · dY_t [O, n·L],  then col2im into dx
//   weight-grad   dW_t [O, K]  += dY_t [O, n·L] · colsᵀ [n·L, K]     (summed over tasks if shared)
//
// K = C·kh·kw, L = H'·W', n the examples of one chunk. The input-grad's GEMM issues exactly
// the convolution's multiply-adds at every stride: each product of dcols is one term of dx,
// which col2im adds where it lands, and none is by a tap off the stride grid. So the
// Triton input-grad's split by output phase (kernels/task_conv2d.py), which removed 3/4 of
// its MACs at stride 2, has nothing to remove here: at W2's strided layers (32 tasks × 5,
// 64 → 64 channels, 3×3, stride 2) the input-grad takes about what the forward takes
// (14×14 inputs 6.35 against 5.56 ms, 7×7 2.19 against 2.02; medians of 15, interleaved,
// 2-core Intel Xeon, shared). Why not the reference's grouped
// convolution (one oneDNN call for all tasks): oneDNN runs a per-task weight as groups = T, with layout copies around it,
// at a fraction of the GEMM rate (bench/bench_conv_cpu.py has the numbers). Why im2col and
// not at::bmm on an unfold buffer: every aten call inside a kernel is a dispatch (a launch
// on a GPU; fastmeta profile --count counts them), and F.unfold alone took longer than the
// whole grouped convolution at W2's second layer.
//
// The GEMMs are the Fortran BLAS that torch itself links (MKL in the x86-64 wheels),
// called directly, or where torch exports none the hand-written micro-kernel of gemm.h:
// at these shapes MKL ran 2–9x faster than gemm.h (e.g. 114 µs against 398 µs for W2's
// second layer, one task: 64 × 245 × 576), gemm.h being written for W1's 10 × 40 × 40.
// Every GEMM here has the form C = A·B with A read through strides and B row-major, which
// both take, so the two paths share all the rest. FASTMETA_CPU_BLAS=0 (read once) forces
// gemm.h; the tests run both.
//
// Examples are taken in chunks whose im2col buffer stays within ~kColsBudget values (in
// L2: 1.3 MB of floats per core on this class of machine), and (task, chunk) pairs are the
// parallel work items; BLAS runs single-threaded inside them (MKL does inside an OpenMP
// region). Per-task weights may be views with any task stride (a slice of the flat [T, P]
// buffer) as long as each task's block is contiguous; a task stride of 0 arrives as a
// shared 4-D weight.
#include <ATen/Config.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#if AT_MKLDNN_ENABLED()
#include <ATen/ops/convolution_backward_native.h>
#include <ATen/ops/mkldnn_convolution_native.h>
#endif

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "cpu_common.h"
#include "eager_nodes.h"
#include "blas.h"  // sgemm_/dgemm_, weak: without a Fortran BLAS the kernels take gemm.h
#include "gemm.h"

namespace fastmeta {
namespace cpu {
namespace {

// Values per im2col chunk: 1 << 18 floats = 1 MB, within one core's L2 with the GEMM's
// packed panels. bench/bench_conv_cpu.py --budget swept 2^15..2^20 (RESULTS.md).
constexpr int64_t kColsBudget = 1 << 18;

bool blas_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("FASTMETA_CPU_BLAS");
    return !(env != nullptr && std::strcmp(env, "0") == 0);
  }();
  return enabled;
}

template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*, const int*,
                          const T*, const int*, const T*, T*, const int*);

template <typename T>
BlasGemm<T> blas_routine();
template <>
BlasGemm<float> blas_routine<float>() {
  return sgemm_;
}
template <>
BlasGemm<double> blas_routine<double>() {
  return dgemm_;
}

bool fits_int(std::initializer_list<int64_t> values) {
  return std::all_of(values.begin(), values.end(), [](int64_t v) { return v >= 0 && v <= INT_MAX; });
}

// How a column-major BLAS sees X [R × Cn] (element (r, c) at r·rs + c·cs) when it must
// read Xᵀ: contiguous rows are Xᵀ itself ('N', ld rs), contiguous columns X ('T', ld cs).
// BLAS wants a leading dimension of at least the stored rows even where it is never used
// (one row or one column, e.g. a 1×1 kernel's Wᵀ with both strides 1).
bool blas_view(int64_t R, int64_t Cn, int64_t rs, int64_t cs, char& trans, int& ld) {
  if (cs == 1 && (rs >= Cn || R <= 1)) {
    trans = 'N';
    ld = int(std::max<int64_t>({rs, Cn, 1}));
    return true;
  }
  if (rs == 1 && (cs >= R || Cn <= 1)) {
    trans = 'T';
    ld = int(std::max<int64_t>({cs, R, 1}));
    return true;
  }
  return false;
}

// C[M,N] (+)= A[M,K] · B[K,N], A and B through strides (element (r, c) at r·rs + c·cs),
// C row-major with leading dimension ldc.
template <typename T>
void matmul(int64_t M, int64_t N, int64_t K, const T* A, int64_t a_rs, int64_t a_cs, const T* B, int64_t b_rs,
            int64_t b_cs, T* C, int64_t ldc, bool accumulate) {
  BlasGemm<T> blas = blas_routine<T>();
  char ta, tb;
  int la, lb;
  if (blas != nullptr && blas_enabled() && fits_int({M, N, K, a_rs, a_cs, b_rs, b_cs, ldc}) &&
      blas_view(M, K, a_rs, a_cs, ta, la) && blas_view(K, N, b_rs, b_cs, tb, lb)) {
    // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ.
    const int m = int(N), n = int(M), k = int(K), lc = int(std::max<int64_t>({M <= 1 ? N : ldc, ldc, 1}));
    const T alpha = T(1), beta = accumulate ? T(1) : T(0);
    blas(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    return;
  }
  if (b_cs == 1) {
    gemm<T>(M, N, K, A, a_rs, a_cs, B, b_rs, C, ldc, accumulate);
    return;
  }
  std::vector<T> rows(K * N);  // gemm.h streams B by rows
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) rows[k * N + n] = B[k * b_rs + n * b_cs];
  gemm<T>(M, N, K, A, a_rs, a_cs, rows.data(), N, C, ldc, accumulate);
}

struct ConvShape {
  int64_t T, N, C, H, W, O, KH, KW, SH, SW, PH, PW, HO, WO;
  int64_t K() const { return C * KH * KW; }
  int64_t L() const { return HO * WO; }
  // Examples per chunk (at least 1, the chunks as even as possible) and the chunk count.
  int64_t chunk() const {
    const int64_t per = std::max<int64_t>(1, kColsBudget / std::max<int64_t>(K() * L(), 1));
    const int64_t chunks = (N + per - 1) / per;
    return chunks == 0 ? 1 : (N + chunks - 1) / chunks;
  }
  int64_t chunks() const { return N == 0 ? 0 : (N + chunk() - 1) / chunk(); }
};

// The output rows oh whose input row oh·SH − PH + i lies in [0, H), and the columns ow
// whose input column ow·SW − PW + j lies in [0, W): [lo, hi) each.
inline void valid_range(int64_t out, int64_t in, int64_t stride, int64_t pad, int64_t tap, int64_t& lo,
                        int64_t& hi) {
  lo = pad - tap > 0 ? (pad - tap + stride - 1) / stride : 0;
  const int64_t last = in - 1 + pad - tap;
  hi = last < 0 ? 0 : std::min(out, last / stride + 1);
  lo = std::min(lo, hi);
}

// One output row of im2col: out[ow] = src[ow·SW] on [lo, hi), 0 elsewhere. The stride is
// a template argument where it is 1 or 2 (every conv of W1–W4): the compiler then turns
// the strided read into vector shuffles instead of a scalar loop.
template <typename T, int kSW>
inline void gather_row(const T* src, int64_t sw, int64_t lo, int64_t hi, int64_t WO, T* out) {
  for (int64_t ow = 0; ow < lo; ++ow) out[ow] = T(0);
  if (kSW == 1) {
#pragma omp simd
    for (int64_t ow = lo; ow < hi; ++ow) out[ow] = src[ow];
  } else if (kSW == 2) {
#pragma omp simd
    for (int64_t ow = lo; ow < hi; ++ow) out[ow] = src[2 * ow];
  } else {
    for (int64_t ow = lo; ow < hi; ++ow) out[ow] = src[ow * sw];
  }
  for (int64_t ow = hi; ow < WO; ++ow) out[ow] = T(0);
}

// cols[(c, i, j), (n, oh, ow)] = x[n, c, oh·SH − PH + i, ow·SW − PW + j] (0 outside) for the
// nb examples at x (one task's, contiguous); rows of nb·L values.
template <typename T, int kSW>
void im2col_stride(const T* x, const ConvShape& s, int64_t nb, T* cols) {
  const int64_t L = s.L(), ld = nb * L, plane = s.H * s.W;
  for (int64_t i = 0; i < s.KH; ++i) {
    int64_t oh_lo, oh_hi;
    valid_range(s.HO, s.H, s.SH, s.PH, i, oh_lo, oh_hi);
    for (int64_t j = 0; j < s.KW; ++j) {
      int64_t lo, hi;
      valid_range(s.WO, s.W, s.SW, s.PW, j, lo, hi);
      for (int64_t c = 0; c < s.C; ++c) {
        T* row = cols + ((c * s.KH + i) * s.KW + j) * ld;
        for (int64_t n = 0; n < nb; ++n) {
          const T* src = x + (n * s.C + c) * plane + (oh_lo * s.SH - s.PH + i) * s.W - s.PW + j;
          T* out = row + n * L;
          std::fill(out, out + oh_lo * s.WO, T(0));
          for (int64_t oh = oh_lo; oh < oh_hi; ++oh, src += s.SH * s.W)
            gather_row<T, kSW>(src, s.SW, lo, hi, s.WO, out + oh * s.WO);
          std::fill(out + oh_hi * s.WO, out + L, T(0));
        }
      }
    }
  }
}

// For each tap (i, j), the offset ih·W + iw in an input plane of each output position
// l = oh·WO + ow, or -1 where it falls in the padding: [KH·KW, L].
std::vector<int32_t> tap_offsets(const ConvShape& s) {
  const int64_t L = s.L();
  std::vector<int32_t> table(s.KH * s.KW * L);
  for (int64_t i = 0; i < s.KH; ++i)
    for (int64_t j = 0; j < s.KW; ++j)
      for (int64_t oh = 0; oh < s.HO; ++oh)
        for (int64_t ow = 0; ow < s.WO; ++ow) {
          const int64_t ih = oh * s.SH - s.PH + i, iw = ow * s.SW - s.PW + j;
          const bool inside = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W;
          table[(i * s.KW + j) * L + oh * s.WO + ow] = inside ? int32_t(ih * s.W + iw) : -1;
        }
  return table;
}

// im2col through the offset table: one branch-free pass of L values per (c, i, j, n),
// whatever the stride.
template <typename T>
void im2col_table(const T* x, const ConvShape& s, const int32_t* table, int64_t nb, T* cols) {
  const int64_t L = s.L(), ld = nb * L, plane = s.H * s.W, taps = s.KH * s.KW;
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t tap = 0; tap < taps; ++tap) {
      const int32_t* idx = table + tap * L;
      T* row = cols + (c * taps + tap) * ld;
      for (int64_t n = 0; n < nb; ++n) {
        const T* in = x + (n * s.C + c) * plane;
        T* out = row + n * L;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) out[l] = idx[l] >= 0 ? in[idx[l]] : T(0);
      }
    }
}

// Output rows of at most this many values take the table: per row, the row path's setup
// costs more than its copy (single thread, interleaved: the table was 1.07-2.25x faster
// at W2's 4×4 and 1.55x at its 2×2 outputs, 0.95x at 7×7 and 0.67x at W4's 42×42).
constexpr int64_t kTableWidth = 4;

// The weight-grad takes dY_t straight from grad_out, one GEMM per example, from this many
// output positions per example up; below, one gathered [O, n·L] copy and one GEMM. Single
// thread, interleaved: per example was 1.33x faster at L = 196 (W2's first layer), 1.15x
// at 441, even at 49–100, 0.90x at 16 and 0.72x at 4.
constexpr int64_t kPerExampleL = 128;

template <typename T>
void im2col(const T* x, const ConvShape& s, const int32_t* table, int64_t nb, T* cols) {
  if (s.WO <= kTableWidth) return im2col_table<T>(x, s, table, nb, cols);
  if (s.SW == 1) return im2col_stride<T, 1>(x, s, nb, cols);
  if (s.SW == 2) return im2col_stride<T, 2>(x, s, nb, cols);
  im2col_stride<T, 0>(x, s, nb, cols);
}

// dx[n, c, ih, iw] += dcols[(c, i, j), (n, oh, ow)]: the adjoint of im2col, into nb
// examples' dx (zeroed by the caller).
template <typename T>
void col2im(const T* dcols, const ConvShape& s, int64_t nb, T* dx) {
  const int64_t L = s.L(), ld = nb * L;
  for (int64_t c = 0; c < s.C; ++c)
    for (int64_t i = 0; i < s.KH; ++i)
      for (int64_t j = 0; j < s.KW; ++j) {
        const T* row = dcols + ((c * s.KH + i) * s.KW + j) * ld;
        int64_t lo, hi;
        valid_range(s.WO, s.W, s.SW, s.PW, j, lo, hi);
        for (int64_t n = 0; n < nb; ++n) {
          T* plane = dx + (n * s.C + c) * s.H * s.W;
          for (int64_t oh = 0; oh < s.HO; ++oh) {
            const int64_t ih = oh * s.SH - s.PH + i;
            if (ih < 0 || ih >= s.H) continue;
            const T* in = row + n * L + oh * s.WO;
            T* dst = plane + ih * s.W - s.PW + j;
            if (s.SW == 1) {
#pragma omp simd
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += in[ow];
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow * s.SW] += in[ow];
            }
          }
        }
      }
}

// A per-task tensor (rank `per_task_dim`) or a shared one (one rank less): its task stride
// (0 if shared), after checking that each task's block is contiguous.
int64_t task_stride(const at::Tensor& t, int64_t per_task_dim, const char* name) {
  FM_CHECK_DEVICE(t, kCPU);
  if (t.dim() == per_task_dim - 1) {
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
    return 0;
  }
  TORCH_CHECK_VALUE(t.dim() == per_task_dim, name, " must have ", per_task_dim - 1, " or ", per_task_dim, " dims, got ",
              t.sizes());
  TORCH_CHECK_VALUE(t.size(0) == 0 || t[0].is_contiguous(), name, ": each task's block must be contiguous");
  TORCH_CHECK_VALUE(t.stride(0) >= 0, name, ": negative task stride");
  return t.stride(0);
}

ConvShape make_shape(int64_t T, int64_t N, int64_t C, int64_t H, int64_t W, int64_t O, at::IntArrayRef kernel,
                     at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2,
              "kernel_size, stride and padding must have two values each");
  ConvShape s{T, N, C, H, W, O, kernel[0], kernel[1], stride[0], stride[1], padding[0], padding[1], 0, 0};
  TORCH_CHECK_VALUE(s.SH >= 1 && s.SW >= 1 && s.PH >= 0 && s.PW >= 0 && s.KH >= 1 && s.KW >= 1,
              "stride and kernel must be >= 1 and padding >= 0");
  s.HO = (H + 2 * s.PH - s.KH) / s.SH + 1;
  s.WO = (W + 2 * s.PW - s.KW) / s.SW + 1;
  TORCH_CHECK_VALUE(H + 2 * s.PH >= s.KH && W + 2 * s.PW >= s.KW, "the kernel is larger than the padded input");
  return s;
}

// ---------------------------------------------------------------------------------------
// The oneDNN route: large fp32 convolutions go to the convolution kernels torch itself runs
// on the CPU (oneDNN, through ATen's CPU kernels called as functions, at::native::: no
// dispatcher, no autograd, no dispatch to count), one call per task, or one for all tasks
// where the weights (and bias) are shared. Where a call's problem is large, oneDNN's direct
// convolution outruns im2col + GEMM, whose im2col/col2im passes move K·L values per example
// through memory; where it is small, the call's fixed cost (primitive lookup, weight
// reorder) loses. The rule, from bench/bench_conv_routes.py (docs/benchmarks.md,
// "Convolutions on the CPU" has its table): a kernel larger than 1×1, at least 16 input
// channels, and at least kOneDnnMinMacs[pass] multiply-adds per call; for the weight
// gradient also at least kOneDnnMinWeightGradL output positions per example (at 4×4 outputs
// oneDNN's weight gradient was even or slower on the AVX2-era machine of the first table).
// The input gradient: at stride 1 mostly as the forward convolution it is there (the flipped
// kernel); at a larger stride oneDNN's backward-data from kOneDnnMinStridedInputGradMacs (on
// channels-last copies of its operands, see onednn_input_grad: no dispatch; below it the
// call's fixed costs and the two transposes lose to im2col). FASTMETA_CPU_CONV=onednn sends
// every fp32 convolution oneDNN supports there (the tests' route), =im2col none; read once
// per process. float64 always takes im2col (oneDNN has no f64 convolution).
constexpr int64_t kOneDnnMinMacs[3] = {int64_t(2) << 20, int64_t(2) << 20, int64_t(8) << 20};  // by ConvPass
constexpr int64_t kOneDnnMinWeightGradL = 32;
constexpr int64_t kOneDnnMinStridedInputGradMacs = int64_t(8) << 20;

// Whether the input gradient is itself a convolution (stride 1, padding at most k − 1): of
// grad_out with the flipped kernel, padded by k − 1 − p.
bool input_grad_is_a_convolution(const ConvShape& s) {
  return s.SH == 1 && s.SW == 1 && s.PH <= s.KH - 1 && s.PW <= s.KW - 1;
}

enum class ConvRoute { kAuto, kOneDnn, kIm2col };
enum class ConvPass { kForward, kInputGrad, kWeightGrad };

ConvRoute conv_route() {
  static const ConvRoute route = [] {
    const char* env = std::getenv("FASTMETA_CPU_CONV");
    if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return ConvRoute::kAuto;
    if (std::strcmp(env, "onednn") == 0) return ConvRoute::kOneDnn;
    if (std::strcmp(env, "im2col") == 0) return ConvRoute::kIm2col;
    TORCH_CHECK_VALUE(false, "FASTMETA_CPU_CONV must be auto, onednn or im2col, got '", env, "'");
    return ConvRoute::kAuto;
  }();
  return route;
}

// Whether a pass of this convolution takes oneDNN; `calls_tasks` is how many tasks each call
// covers (s.T for one batched call over shared weights, else 1).
template <typename T_>
bool takes_onednn(const ConvShape& s, ConvPass pass, int64_t calls_tasks) {
#if AT_MKLDNN_ENABLED()
  if (!std::is_same<T_, float>::value || !at::globalContext().userEnabledMkldnn() || !at::hasMKLDNN()) return false;
  if (s.T * s.N * s.C * s.O * s.L() == 0) return false;  // oneDNN refuses empty tensors; im2col writes what is due
  const ConvRoute route = conv_route();
  if (route != ConvRoute::kAuto) return route == ConvRoute::kOneDnn;
  if (s.KH * s.KW == 1 || s.C < 16) return false;
  const int64_t macs = calls_tasks * s.N * s.O * s.K() * s.L();
  if (pass == ConvPass::kInputGrad && !input_grad_is_a_convolution(s) && macs < kOneDnnMinStridedInputGradMacs)
    return false;
  if (macs < kOneDnnMinMacs[static_cast<int>(pass)]) return false;
  return pass != ConvPass::kWeightGrad || s.L() >= kOneDnnMinWeightGradL;
#else
  (void)s;
  (void)pass;
  (void)calls_tasks;
  return false;
#endif
}

template <typename T>
std::unique_ptr<T[]> scratch(int64_t n);

#if AT_MKLDNN_ENABLED()
// A tensor over memory the kernel owns or was given (no copy, no dispatch): the calls below
// read inputs through these and never write them.
template <typename T_>
at::Tensor blob_tensor(const T_* data, at::IntArrayRef sizes) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  c10::Storage storage(c10::Storage::use_byte_size_t(), numel * int64_t(sizeof(T_)),
                       c10::DataPtr(const_cast<T_*>(data), c10::Device(c10::DeviceType::CPU)), nullptr, false);
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                          caffe2::TypeMeta::Make<T_>());
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

// The same over memory laid out channels-last: sizes [n, c, h, w] (NCHW order, as ATen
// takes them), each position's c values adjacent (torch.channels_last's strides).
template <typename T_>
at::Tensor channels_last_blob(const T_* data, at::IntArrayRef sizes) {
  at::Tensor t = blob_tensor<T_>(data, sizes);
  const int64_t c = sizes[1], h = sizes[2], w = sizes[3];
  const std::array<int64_t, 4> strides{c * h * w, 1, w * c, c};
  t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  return t;
}

// dst[b][j][i] = src[b][i][j] for b < batches, i < rows, j < cols: an NCHW block to
// channels-last (rows = channels, cols = positions).
template <typename T_>
void to_channels_last(const T_* src, T_* dst, int64_t batches, int64_t rows, int64_t cols) {
  for (int64_t b = 0; b < batches; ++b, src += rows * cols, dst += rows * cols)
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) dst[j * rows + i] = src[i * cols + j];
}

// dst = src (+ dst when accumulating), n values.
template <typename T_>
void store(const at::Tensor& src, T_* dst, int64_t n, bool accumulate) {
  const T_* v = src.data_ptr<T_>();
  if (accumulate) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] += v[i];
  } else {
    std::memcpy(dst, v, n * sizeof(T_));
  }
}

std::array<bool, 3> mask_of(ConvPass pass) {
  return {pass == ConvPass::kInputGrad, pass == ConvPass::kWeightGrad, false};
}

// The arguments of ATen's convolution kernels for calls over n examples: the geometry, and
// the sizes of the input, weight and output tensors, from these named arrays: sizes written
// as braced lists at the calls arrived as zeros in the first weight-gradient call (GCC 12,
// -O3 -march=native; the same lists in one small file did not).
struct Geometry {
  std::array<int64_t, 2> padding, stride, dilation, output_padding;
  std::array<int64_t, 4> input, weight, output;
  std::array<int64_t, 1> bias;
  Geometry(const ConvShape& s, int64_t n)
      : padding{s.PH, s.PW},
        stride{s.SH, s.SW},
        dilation{1, 1},
        output_padding{0, 0},
        input{n, s.C, s.H, s.W},
        weight{s.O, s.C, s.KH, s.KW},
        output{n, s.O, s.HO, s.WO},
        bias{s.O} {}
};

// Whether one forward call covers all tasks: w (and b) shared.
inline bool forward_is_batched(int64_t w_ts, const void* bp, int64_t b_ts) {
  return w_ts == 0 && (bp == nullptr || b_ts == 0);
}

// y (+)= conv(x, w) + b through oneDNN: one call per task, or one over all tasks when w (and
// b) are shared.
template <typename T_>
void onednn_forward(const ConvShape& s, const T_* xp, const T_* wp, int64_t w_ts, const T_* bp, int64_t b_ts, T_* yp,
                    bool accumulate) {
  const bool batched = forward_is_batched(w_ts, bp, b_ts);
  const int64_t n = batched ? s.T * s.N : s.N, image = s.C * s.H * s.W, out = s.O * s.L();
  const Geometry g(s, n);
  for (int64_t t = 0; t < (batched ? 1 : s.T); ++t) {
    c10::optional<at::Tensor> bias;
    if (bp != nullptr) bias = blob_tensor<T_>(bp + t * b_ts, g.bias);
    const at::Tensor r = at::native::mkldnn_convolution(blob_tensor<T_>(xp + t * s.N * image, g.input),
                                                        blob_tensor<T_>(wp + t * w_ts, g.weight), bias,
                                                        g.padding, g.stride, g.dilation, 1);
    store<T_>(r, yp + t * s.N * out, n * out, accumulate);
  }
}

// dx = the input gradient through oneDNN, plus addp when given.
template <typename T_>
void onednn_input_grad(const ConvShape& s, const T_* gp, const T_* wp, int64_t w_ts, T_* dxp, const T_* addp) {
  const bool batched = w_ts == 0;
  const int64_t n = batched ? s.T * s.N : s.N, image = s.C * s.H * s.W, out = s.O * s.L();
  const Geometry g(s, n);
  // The flip copies O·C·kh·kw values per call where backward-data's transposes copy
  // n·(O·L + C·H·W): the flip where it is the smaller (every stride-1 layer of W1–W4),
  // backward-data where the kernel is the larger (ResNet-12's deep stages: 640 × 320 × 9
  // against 25 × 320 × 4 × 4).
  if (input_grad_is_a_convolution(s) && s.O * s.KH * s.KW <= n * s.H * s.W) {
    // At stride 1 the input gradient is a convolution of grad_out with the kernel flipped
    // and its channels swapped, padded by k − 1 − p: oneDNN's forward, whose result needs no
    // copy back (see takes_onednn).
    const std::array<int64_t, 4> flipped_sizes{s.C, s.O, s.KH, s.KW};
    const std::array<int64_t, 2> flipped_padding{s.KH - 1 - s.PH, s.KW - 1 - s.PW}, unit{1, 1};
    auto flipped = scratch<T_>(s.C * s.O * s.KH * s.KW);
    for (int64_t t = 0; t < (batched ? 1 : s.T); ++t) {
      const T_* w = wp + t * w_ts;
      for (int64_t c = 0; c < s.C; ++c)  // in the flipped kernel's order: its writes sequential
        for (int64_t o = 0; o < s.O; ++o)
          for (int64_t i = 0; i < s.KH; ++i)
            for (int64_t j = 0; j < s.KW; ++j)
              flipped[((c * s.O + o) * s.KH + (s.KH - 1 - i)) * s.KW + (s.KW - 1 - j)] =
                  w[((o * s.C + c) * s.KH + i) * s.KW + j];
      const at::Tensor r = at::native::mkldnn_convolution(
          blob_tensor<T_>(gp + t * s.N * out, g.output), blob_tensor<T_>(flipped.get(), flipped_sizes), c10::nullopt,
          flipped_padding, unit, unit, 1);
      TORCH_CHECK(r.numel() == n * image, "task_conv2d: the flipped convolution gave ", r.sizes());
      T_* dx = dxp + t * s.N * image;
      if (addp != nullptr) std::memcpy(dx, addp + t * s.N * image, n * image * sizeof(T_));
      store<T_>(r, dx, n * image, addp != nullptr);
    }
    return;
  }
  // Else oneDNN's backward-data (strided layers; stride-1 ones whose kernel is the larger
  // copy), given its operands channels-last: oneDNN computes the input gradient in that
  // layout, and ATen, handed NCHW tensors, converts grad_out to it and the result back with
  // an aten::clone each (a dispatch per call; none with channels-last operands). So the
  // kernel transposes grad_out and w into channels-last scratch, and the result into dx, in
  // its own loops.
  const int64_t L = s.L(), HW = s.H * s.W, KK = s.KH * s.KW;
  auto grad_last = scratch<T_>(n * out);
  auto w_last = scratch<T_>(s.O * s.C * KK);
  for (int64_t t = 0; t < (batched ? 1 : s.T); ++t) {
    T_* dx = dxp + t * s.N * image;
    to_channels_last<T_>(gp + t * s.N * out, grad_last.get(), n, s.O, L);
    to_channels_last<T_>(wp + t * w_ts, w_last.get(), s.O, s.C, KK);
    // The input's data is not read for the input gradient, only its geometry: dx's own
    // (uninitialised) buffer carries it.
    const at::Tensor r = std::get<0>(at::native::convolution_backward(
        channels_last_blob<T_>(grad_last.get(), g.output), channels_last_blob<T_>(dx, g.input),
        channels_last_blob<T_>(w_last.get(), g.weight), c10::nullopt, g.stride, g.padding, g.dilation, false,
        g.output_padding, 1, mask_of(ConvPass::kInputGrad)));
    TORCH_CHECK(r.dim() == 4 && r.numel() == n * image, "task_conv2d: oneDNN's input gradient gave ", r.sizes());
    const T_* rp = r.data_ptr<T_>();
    const int64_t se = r.stride(0), sc = r.stride(1), sh = r.stride(2), sw = r.stride(3);
    const T_* add = addp != nullptr ? addp + t * s.N * image : nullptr;
    for (int64_t e = 0; e < n; ++e)
      for (int64_t c = 0; c < s.C; ++c) {
        T_* d = dx + (e * s.C + c) * HW;
        const T_* a = add != nullptr ? add + (e * s.C + c) * HW : nullptr;
        const T_* src = rp + e * se + c * sc;
        for (int64_t h = 0; h < s.H; ++h)
          for (int64_t x = 0; x < s.W; ++x)
            d[h * s.W + x] = (a != nullptr ? a[h * s.W + x] : T_(0)) + src[h * sh + x * sw];
      }
  }
}

// dw = the weight gradient through oneDNN (summed over tasks, by one call over all of them,
// when shared), plus addp when given.
template <typename T_>
void onednn_weight_grad(const ConvShape& s, const T_* gp, const T_* xp, bool shared, T_* dwp, const T_* addp) {
  const int64_t n = shared ? s.T * s.N : s.N, image = s.C * s.H * s.W, out = s.O * s.L(), OK = s.O * s.K();
  const Geometry g(s, n);
  for (int64_t t = 0; t < (shared ? 1 : s.T); ++t) {
    T_* dw = dwp + t * OK;
    // As above, the weight's geometry only: dw's buffer carries it.
    const at::Tensor r = std::get<1>(at::native::convolution_backward(
        blob_tensor<T_>(gp + t * s.N * out, g.output), blob_tensor<T_>(xp + t * s.N * image, g.input),
        blob_tensor<T_>(dw, g.weight), c10::nullopt, g.stride, g.padding, g.dilation, false, g.output_padding, 1,
        mask_of(ConvPass::kWeightGrad)));
    if (addp != nullptr) std::memcpy(dw, addp + t * OK, OK * sizeof(T_));
    store<T_>(r, dw, OK, addp != nullptr);
  }
}
#endif

// Per-thread scratch, uninitialised (a std::vector would zero it on every call).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[std::max<int64_t>(n, 1)]);
}

// The three convolutions, each writing into a given output: the public ops' entry points
// below check and allocate, then call these. Pointers are to contiguous [T, N, ...] blocks,
// except the weights (and bias), which are read at a task stride (0: shared).

// y (+)= conv(x, w) + b: with `accumulate`, the convolution and bias are added to what y
// holds (the double backward's d grad_out = conv(g_dx, w) + conv(x, g_dw), summed in the
// second call's GEMM or scatter pass instead of by a separate add).
template <typename T_>
void forward_into(const ConvShape& s, const T_* xp, const T_* wp, int64_t w_ts, const T_* bp, int64_t b_ts, T_* yp,
                  bool accumulate) {
  if (s.T * s.N * s.O * s.L() == 0) return;
#if AT_MKLDNN_ENABLED()
  if (takes_onednn<T_>(s, ConvPass::kForward, forward_is_batched(w_ts, bp, b_ts) ? s.T : 1))
    return onednn_forward<T_>(s, xp, wp, w_ts, bp, b_ts, yp, accumulate);
#endif
  const int64_t K = s.K(), L = s.L(), nb = s.chunk(), chunks = s.chunks();
  const std::vector<int32_t> table = tap_offsets(s);
  at::parallel_for(0, s.T * chunks, 1, [&](int64_t i0, int64_t i1) {
    auto cols = scratch<T_>(K * nb * L);
    auto out = scratch<T_>(s.O * nb * L);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t t = item / chunks, n0 = (item % chunks) * nb, n = std::min(nb, s.N - n0);
      im2col<T_>(xp + (t * s.N + n0) * s.C * s.H * s.W, s, table.data(), n, cols.get());
      // One example: the GEMM's [O, L] is y's own layout (accumulating there, beta = 1);
      // more: [O, n·L] into scratch, then scattered (added where accumulating).
      T_* dst = yp + (t * s.N + n0) * s.O * L;
      const bool direct = n == 1;
      T_* target = direct ? dst : out.get();
      matmul<T_>(s.O, n * L, K, wp + t * w_ts, K, 1, cols.get(), n * L, 1, target, n * L, direct && accumulate);
      if (direct && bp == nullptr) continue;
      for (int64_t e = 0; e < n; ++e)
        for (int64_t o = 0; o < s.O; ++o) {
          const T_ bias = bp ? bp[t * b_ts + o] : T_(0);
          const T_* src = target + o * n * L + e * L;
          T_* row = dst + (e * s.O + o) * L;
          if (accumulate && !direct) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) row[l] += src[l] + bias;
          } else {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) row[l] = src[l] + bias;
          }
        }
    }
  });
}

// dx = the input gradient of conv(·, w) at grad_out, plus `addp` (x's shape) when given:
// col2im scatters into a buffer that starts from the addend instead of zeros (the gradient
// autograd's engine would otherwise add with an aten op, see task_conv2d_backward).
template <typename T_>
void input_grad_into(const ConvShape& s, const T_* gp, const T_* wp, int64_t w_ts, T_* dxp,
                     const T_* addp = nullptr) {
  if (s.T * s.N * s.C * s.H * s.W == 0) return;
#if AT_MKLDNN_ENABLED()
  if (s.O * s.L() > 0 && takes_onednn<T_>(s, ConvPass::kInputGrad, w_ts == 0 ? s.T : 1))
    return onednn_input_grad<T_>(s, gp, wp, w_ts, dxp, addp);
#endif
  const int64_t K = s.K(), L = s.L(), nb = s.chunk(), chunks = s.chunks(), image = s.C * s.H * s.W;
  at::parallel_for(0, s.T * chunks, 1, [&](int64_t i0, int64_t i1) {
    auto dcols = scratch<T_>(K * nb * L);
    auto gathered = scratch<T_>(s.O * nb * L);
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t t = item / chunks, n0 = (item % chunks) * nb, n = std::min(nb, s.N - n0);
      // dY_t as [O, n·L]: one example's [O, L] is grad_out's own layout.
      const T_* g = gp + (t * s.N + n0) * s.O * L;
      const T_* dy = g;
      if (n > 1) {
        for (int64_t e = 0; e < n; ++e)
          for (int64_t o = 0; o < s.O; ++o)
            std::copy(g + (e * s.O + o) * L, g + (e * s.O + o + 1) * L, gathered.get() + o * n * L + e * L);
        dy = gathered.get();
      }
      matmul<T_>(K, n * L, s.O, wp + t * w_ts, 1, K, dy, n * L, 1, dcols.get(), n * L, false);
      T_* d = dxp + (t * s.N + n0) * image;
      if (addp != nullptr) {
        const T_* a = addp + (t * s.N + n0) * image;
        std::copy(a, a + n * image, d);
      } else {
        std::fill(d, d + n * image, T_(0));
      }
      col2im<T_>(dcols.get(), s, n, d);
    }
  });
}

// dw = the weight gradient of conv(x, ·) at grad_out: per task [T, O, K], or [O, K] summed
// over tasks when `shared`; plus `addp` (dw's shape) when given: dw starts as the addend and
// every GEMM accumulates into it (beta = 1).
template <typename T_>
void weight_grad_into(const ConvShape& s, const T_* gp, const T_* xp, bool shared, T_* dwp,
                      const T_* addp = nullptr) {
  const int64_t K = s.K(), L = s.L(), OK = s.O * K;
  const int64_t size = shared ? OK : s.T * OK;
  if (size == 0) return;
#if AT_MKLDNN_ENABLED()
  if (s.N > 0 && s.T > 0 && s.L() > 0 && takes_onednn<T_>(s, ConvPass::kWeightGrad, shared ? s.T : 1))
    return onednn_weight_grad<T_>(s, gp, xp, shared, dwp, addp);
#endif
  if (addp != nullptr) std::copy(addp, addp + size, dwp);
  const int64_t nb = s.chunk(), chunks = s.chunks();
  const std::vector<int32_t> table = tap_offsets(s);
  // dW [O, K] (+)= dY [O, n·L] · colsᵀ over the items [i0, i1) (one task's chunks, or any
  // when shared); the first item writes, the rest add (all add into a dW that starts as
  // the addend: `initialised`).
  auto accumulate = [&](int64_t i0, int64_t i1, T_* dw_out, T_* cols, T_* gathered, bool initialised) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t t = item / chunks, n0 = (item % chunks) * nb, n = std::min(nb, s.N - n0);
      im2col<T_>(xp + (t * s.N + n0) * s.C * s.H * s.W, s, table.data(), n, cols);
      const T_* g = gp + (t * s.N + n0) * s.O * L;
      if (L >= kPerExampleL) {  // dY_t straight from grad_out, one GEMM per example
        for (int64_t e = 0; e < n; ++e)
          matmul<T_>(s.O, K, L, g + e * s.O * L, L, 1, cols + e * L, 1, n * L, dw_out, K,
                     initialised || item > i0 || e > 0);
        continue;
      }
      const T_* dy = g;  // else gathered to [O, n·L] for one GEMM (one example's is grad_out's layout)
      if (n > 1) {
        for (int64_t e = 0; e < n; ++e)
          for (int64_t o = 0; o < s.O; ++o)
            std::copy(g + (e * s.O + o) * L, g + (e * s.O + o + 1) * L, gathered + o * n * L + e * L);
        dy = gathered;
      }
      matmul<T_>(s.O, K, n * L, dy, n * L, 1, cols, 1, n * L, dw_out, K, initialised || item > i0);
    }
  };
  if (s.N == 0 || s.T == 0) {
    if (addp == nullptr) std::fill(dwp, dwp + size, T_(0));
  } else if (!shared) {
    at::parallel_for(0, s.T, 1, [&](int64_t t0, int64_t t1) {
      auto cols = scratch<T_>(K * nb * L);
      auto gathered = scratch<T_>(s.O * nb * L);
      for (int64_t t = t0; t < t1; ++t) accumulate(t * chunks, (t + 1) * chunks, dwp + t * OK, cols.get(), gathered.get(),
                                                  addp != nullptr);
    });
  } else {
    // Summed over tasks: the items split into one part per thread, each part's dW
    // accumulated on its own and the parts added in order (deterministic for a given
    // thread count).
    const int64_t items = s.T * chunks;
    const int64_t parts = std::min<int64_t>(items, at::get_num_threads());
    std::vector<T_> partial((parts - 1) * OK);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      auto cols = scratch<T_>(K * nb * L);
      auto gathered = scratch<T_>(s.O * nb * L);
      for (int64_t p = p0; p < p1; ++p)
        accumulate(p * items / parts, (p + 1) * items / parts, p == 0 ? dwp : partial.data() + (p - 1) * OK,
                   cols.get(), gathered.get(), p == 0 && addp != nullptr);
    });
    for (int64_t p = 1; p < parts; ++p)
#pragma omp simd
      for (int64_t v = 0; v < OK; ++v) dwp[v] += partial[(p - 1) * OK + v];
  }
}

// The checks of a weight-shaped tensor (w, or the double backward's g_dw): on the CPU, of
// x's dtype, per task [T, O, C, kh, kw] (any task stride, each task's block contiguous) or
// shared [O, C, kh, kw]; returns its task stride (0 if shared).
int64_t check_weight(const at::Tensor& w, const at::Tensor& x, int64_t T, int64_t O, int64_t C, const char* name) {
  TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), name, " and x must share a dtype, got ", w.scalar_type(),
                   " and ", x.scalar_type());
  const int64_t ts = task_stride(w, 5, name);
  TORCH_CHECK_VALUE(w.dim() == 4 || w.size(0) == T, name, " must have T = ", T, " tasks, got ", w.sizes());
  TORCH_CHECK_VALUE(O < 0 || w.size(-4) == O, name, " has ", w.size(-4), " output channels, expected ", O);
  TORCH_CHECK_VALUE(C < 0 || w.size(-3) == C, name, " has ", w.size(-3), " input channels, x ", C);
  return ts;
}

void check_maps(const ConvShape& s, const at::Tensor& grad_out, const char* name) {
  TORCH_CHECK_VALUE(grad_out.size(0) == s.T && grad_out.size(1) == s.N && grad_out.size(2) == s.O &&
                        grad_out.size(3) == s.HO && grad_out.size(4) == s.WO,
                    name, " is ", grad_out.sizes(), ", the geometry gives [", s.T, ", ", s.N, ", ", s.O, ", ", s.HO,
                    ", ", s.WO, "]");
}

at::Tensor task_conv2d(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                       at::IntArrayRef stride, at::IntArrayRef padding) {
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  FM_CHECK_DIM(x, 5);
  const int64_t w_ts = check_weight(w, x, x.size(0), -1, x.size(2), "w");
  const ConvShape s = make_shape(x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), w.size(-4),
                                 {w.size(-2), w.size(-1)}, stride, padding);
  int64_t b_ts = 0;
  if (b.has_value()) {
    FM_CHECK_SAME_DTYPE(*b, x);
    b_ts = task_stride(*b, 2, "b");
    TORCH_CHECK_VALUE(b->size(-1) == s.O && (b->dim() == 1 || b->size(0) == s.T), "b must be [O] or [T, O], got ",
                b->sizes());
  }
  at::Tensor y = at::empty({s.T, s.N, s.O, s.HO, s.WO}, x.options());
  dispatch_floating(x.scalar_type(), "task_conv2d", [&](auto tag_) {
    using T_ = decltype(tag_);
    forward_into<T_>(s, x.data_ptr<T_>(), w.data_ptr<T_>(), w_ts, b.has_value() ? b->data_ptr<T_>() : nullptr, b_ts,
                     y.data_ptr<T_>(), false);
  });
  return y;
}

at::Tensor task_conv2d_input_grad(const at::Tensor& grad_out, const at::Tensor& w, at::IntArrayRef input_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding) {
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_FLOATING(grad_out);
  FM_CHECK_DIM(grad_out, 5);
  TORCH_CHECK_VALUE(input_size.size() == 2, "input_size must have two values");
  const int64_t T = grad_out.size(0), O = grad_out.size(2);
  const int64_t w_ts = check_weight(w, grad_out, T, O, -1, "w");
  const ConvShape s = make_shape(T, grad_out.size(1), w.size(-3), input_size[0], input_size[1], O,
                                 {w.size(-2), w.size(-1)}, stride, padding);
  check_maps(s, grad_out, "grad_out");
  at::Tensor dx = at::empty({s.T, s.N, s.C, s.H, s.W}, grad_out.options());
  dispatch_floating(grad_out.scalar_type(), "task_conv2d_input_grad", [&](auto tag_) {
    using T_ = decltype(tag_);
    input_grad_into<T_>(s, grad_out.data_ptr<T_>(), w.data_ptr<T_>(), w_ts, dx.data_ptr<T_>());
  });
  return dx;
}

at::Tensor task_conv2d_weight_grad(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding, bool shared) {
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_FLOATING(x);
  FM_CHECK_SAME_DTYPE(grad_out, x);
  FM_CHECK_DIM(x, 5);
  FM_CHECK_DIM(grad_out, 5);
  TORCH_CHECK_VALUE(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1),
              "grad_out and x must share [T, N], got ", grad_out.sizes(), " and ", x.sizes());
  const ConvShape s = make_shape(x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), grad_out.size(2),
                                 kernel_size, stride, padding);
  check_maps(s, grad_out, "grad_out");
  at::Tensor dw = shared ? at::empty({s.O, s.C, s.KH, s.KW}, x.options())
                         : at::empty({s.T, s.O, s.C, s.KH, s.KW}, x.options());
  dispatch_floating(x.scalar_type(), "task_conv2d_weight_grad", [&](auto tag_) {
    using T_ = decltype(tag_);
    weight_grad_into<T_>(s, grad_out.data_ptr<T_>(), x.data_ptr<T_>(), shared, dw.data_ptr<T_>());
  });
  return dw;
}

// The shape of one convolution (x [T, N, C, H, W], w [T, O, C, kh, kw] or [O, C, kh, kw],
// grad_out [T, N, O, H', W']) for the two backward ops, checked; w's task stride in w_ts.
ConvShape backward_shape(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride,
                         at::IntArrayRef padding, int64_t& w_ts) {
  FM_CHECK_INPUT(x, kCPU);
  FM_CHECK_INPUT(grad_out, kCPU);
  FM_CHECK_FLOATING(x);
  FM_CHECK_SAME_DTYPE(grad_out, x);
  FM_CHECK_DIM(x, 5);
  FM_CHECK_DIM(grad_out, 5);
  w_ts = check_weight(w, x, x.size(0), grad_out.size(2), x.size(2), "w");
  const ConvShape s = make_shape(x.size(0), x.size(1), x.size(2), x.size(3), x.size(4), w.size(-4),
                                 {w.size(-2), w.size(-1)}, stride, padding);
  check_maps(s, grad_out, "grad_out");
  return s;
}

std::vector<bool> flags(const c10::List<bool>& mask, size_t count) {
  TORCH_CHECK_VALUE(mask.size() == count, "output_mask must hold ", count, " flags, got ", mask.size());
  std::vector<bool> out;
  for (size_t i = 0; i < count; ++i) out.push_back(mask.get(i));
  return out;
}

// A backward op's addend: absent, or contiguous, of x's dtype and of the output's shape.
const at::Tensor* checked_addend(const c10::optional<at::Tensor>& addend, const at::Tensor& x, at::IntArrayRef shape,
                                 bool wanted, const char* name) {
  if (!addend.has_value()) return nullptr;
  FM_CHECK_INPUT(*addend, kCPU);
  FM_CHECK_SAME_DTYPE(*addend, x);
  TORCH_CHECK_VALUE(wanted, name, " is given for an output output_mask leaves out");
  TORCH_CHECK_VALUE(addend->sizes() == shape, name, " must have shape ", shape, ", got ", addend->sizes());
  return &*addend;
}

// Both gradients of task_conv2d in one op: dx (mask 0) and dw (mask 1), an unwanted one
// returned empty and not computed. dw follows w's rank: [O, C, kh, kw] summed over tasks
// for a 4-D w, [T, O, C, kh, kw] for a 5-D one (even at task stride 0: its gradient is per task).
// dx_addend / dw_addend, when given, are added to dx / dw inside the kernels (col2im starts
// from dx_addend, the weight GEMMs accumulate into dw_addend): task_conv2d's eager node
// passes the gradients its alias outputs received, which autograd's engine would otherwise
// sum with x's and w's gradients by an aten add each.
std::tuple<at::Tensor, at::Tensor> task_conv2d_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& w, at::IntArrayRef stride,
                                                       at::IntArrayRef padding, const c10::List<bool>& output_mask,
                                                       const c10::optional<at::Tensor>& dx_addend,
                                                       const c10::optional<at::Tensor>& dw_addend) {
  int64_t w_ts = 0;
  const ConvShape s = backward_shape(grad_out, x, w, stride, padding, w_ts);
  const std::vector<bool> want = flags(output_mask, 2);
  const at::Tensor* ax = checked_addend(dx_addend, x, x.sizes(), want[0], "dx_addend");
  const at::Tensor* aw = checked_addend(dw_addend, x, w.sizes(), want[1], "dw_addend");
  at::Tensor dx = want[0] ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  at::Tensor dw = want[1] ? at::empty(w.sizes(), x.options()) : at::empty({0}, x.options());
  dispatch_floating(x.scalar_type(), "task_conv2d_backward", [&](auto tag_) {
    using T_ = decltype(tag_);
    if (want[0])
      input_grad_into<T_>(s, grad_out.data_ptr<T_>(), w.data_ptr<T_>(), w_ts, dx.data_ptr<T_>(),
                          ax ? ax->data_ptr<T_>() : nullptr);
    if (want[1])
      weight_grad_into<T_>(s, grad_out.data_ptr<T_>(), x.data_ptr<T_>(), w.dim() == 4, dw.data_ptr<T_>(),
                           aw ? aw->data_ptr<T_>() : nullptr);
  });
  return {dx, dw};
}

// The backward of task_conv2d_backward, for the upstream gradients g_dx (x's shape) and
// g_dw (w's shape), either absent:
//   d grad_out = conv(g_dx, w) + conv(x, g_dw)   (the second GEMM accumulates into the first's output)
//   d x        = input_grad(grad_out, g_dw)
//   d w        = weight_grad(grad_out, g_dx)      (summed over tasks for a 4-D w)
// each only where output_mask asks (else empty); a wanted one whose terms are all absent is zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> task_conv2d_double_backward(
    const c10::optional<at::Tensor>& g_dx, const c10::optional<at::Tensor>& g_dw, const at::Tensor& grad_out,
    const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
    const c10::List<bool>& output_mask) {
  int64_t w_ts = 0, g_dw_ts = 0;
  const ConvShape s = backward_shape(grad_out, x, w, stride, padding, w_ts);
  const std::vector<bool> want = flags(output_mask, 3);
  if (g_dx.has_value()) {
    FM_CHECK_INPUT(*g_dx, kCPU);
    FM_CHECK_SAME_DTYPE(*g_dx, x);
    TORCH_CHECK_VALUE(g_dx->sizes() == x.sizes(), "g_dx must have x's shape ", x.sizes(), ", got ", g_dx->sizes());
  }
  if (g_dw.has_value()) {
    g_dw_ts = check_weight(*g_dw, x, s.T, s.O, s.C, "g_dw");
    TORCH_CHECK_VALUE(g_dw->sizes() == w.sizes(), "g_dw must have w's shape ", w.sizes(), ", got ", g_dw->sizes());
  }
  const auto empty = at::empty({0}, x.options());
  at::Tensor d_grad_out = want[0] ? at::empty(grad_out.sizes(), x.options()) : empty;
  at::Tensor d_x = want[1] ? at::empty(x.sizes(), x.options()) : empty;
  at::Tensor d_w = want[2] ? at::empty(w.sizes(), x.options()) : empty;
  dispatch_floating(x.scalar_type(), "task_conv2d_double_backward", [&](auto tag_) {
    using T_ = decltype(tag_);
    if (want[0]) {
      T_* out = d_grad_out.data_ptr<T_>();
      if (g_dx.has_value())
        forward_into<T_>(s, g_dx->data_ptr<T_>(), w.data_ptr<T_>(), w_ts, nullptr, 0, out, false);
      if (g_dw.has_value())
        forward_into<T_>(s, x.data_ptr<T_>(), g_dw->data_ptr<T_>(), g_dw_ts, nullptr, 0, out, g_dx.has_value());
      if (!g_dx.has_value() && !g_dw.has_value()) std::fill(out, out + d_grad_out.numel(), T_(0));
    }
    if (want[1]) {
      if (g_dw.has_value())
        input_grad_into<T_>(s, grad_out.data_ptr<T_>(), g_dw->data_ptr<T_>(), g_dw_ts, d_x.data_ptr<T_>());
      else
        std::fill(d_x.data_ptr<T_>(), d_x.data_ptr<T_>() + d_x.numel(), T_(0));
    }
    if (want[2]) {
      if (g_dx.has_value())
        weight_grad_into<T_>(s, grad_out.data_ptr<T_>(), g_dx->data_ptr<T_>(), w.dim() == 4, d_w.data_ptr<T_>());
      else
        std::fill(d_w.data_ptr<T_>(), d_w.data_ptr<T_>() + d_w.numel(), T_(0));
    }
  });
  return {d_grad_out, d_x, d_w};
}

// ---------------------------------------------------------------------------------------
// The eager path's autograd nodes in C++ (issue 23, "autograd in C++"): task_conv2d and
// task_conv2d_backward on these CPU kernels, what fastmeta/ops/task_conv2d.py's Python
// nodes do (the alias outputs, the addends, the pair op, the bias sum), with no Python
// between autograd's engine and the kernels. The public op takes them for plain CPU
// tensors whose three conv ops the `cpu` backend runs (fastmeta/ops/task_conv2d.py,
// `_conv_native_node`); everything else keeps the Python node.
//
// Where the backward itself records a graph (create_graph), task_conv2d's node builds
// task_conv2d_backward's; that one's backward under create_graph (third order) calls the
// public op fastmeta::task_conv2d_double_backward through the dispatcher, whose autograd
// is torch.library's. Each kernel call made from a node is one profiler range named as the
// public op, so the dispatch counter (fastmeta/tools/dispatches.py) counts what the Python
// nodes counted.
// ---------------------------------------------------------------------------------------

using namespace eager_nodes;

// A weight-shaped tensor as the kernels take it: each task's block contiguous (any task
// stride), else a contiguous copy.
at::Tensor weight_blocks(const at::Tensor& t) {
  if (t.dim() == 5 && t.size(0) > 0 && t.stride(0) >= 0 && t[0].is_contiguous()) return t;
  return t.contiguous();
}

// task_conv2d_double_backward through the dispatcher: the public op, with its autograd.
std::tuple<at::Tensor, at::Tensor, at::Tensor> public_double_backward(
    const at::Tensor& g_dx, const at::Tensor& g_dw, const at::Tensor& grad_out, const at::Tensor& x,
    const at::Tensor& w, const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
    const c10::List<bool>& mask) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("fastmeta::task_conv2d_double_backward", "");
  const torch::jit::Stack out =
      call_public_op(op, {maybe(g_dx), maybe(g_dw), grad_out, x, w, stride, padding, mask});
  return {out[0].toTensor(), out[1].toTensor(), out[2].toTensor()};
}

struct TaskConv2dBackwardNode : public torch::autograd::Function<TaskConv2dBackwardNode> {
  // (dx, dw) = task_conv2d_backward(grad_out, x, w, ...): inputs grad_out (edge 0), x (1),
  // w (2), then the addends that are given.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x,
                               const at::Tensor& w, std::vector<int64_t> stride, std::vector<int64_t> padding,
                               bool want_dx, bool want_dw, const c10::optional<at::Tensor>& dx_addend,
                               const c10::optional<at::Tensor>& dw_addend) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_out, x, w});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["want_dx"] = want_dx;
    ctx->saved_data["want_dw"] = want_dw;
    ctx->saved_data["has_dx_addend"] = dx_addend.has_value();
    ctx->saved_data["has_dw_addend"] = dw_addend.has_value();
    auto [dx, dw] = recorded("fastmeta::task_conv2d_backward", "fastmeta_ext::task_conv2d_backward", [&] {
      return task_conv2d_backward(grad_out.contiguous(), x, w, stride, padding, bool_list({want_dx, want_dw}),
                                  contiguous(dx_addend), contiguous(dw_addend));
    });
    return {dx, dw};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &x = saved[1], &w = saved[2];
    const bool has_ax = ctx->saved_data["has_dx_addend"].toBool();
    const bool has_aw = ctx->saved_data["has_dw_addend"].toBool();
    const at::Tensor g_dx = upstream(grads[0], ctx->saved_data["want_dx"].toBool());
    const at::Tensor g_dw = upstream(grads[1], ctx->saved_data["want_dw"].toBool());
    // The addends' gradients are the upstream of dx / dw, unchanged.
    const at::Tensor d_ax = has_ax && ctx->needs_input_grad(3) ? g_dx : at::Tensor();
    const at::Tensor d_aw = has_aw && ctx->needs_input_grad(has_ax ? 4 : 3) ? g_dw : at::Tensor();
    const bool m0 = ctx->needs_input_grad(0) && (g_dx.defined() || g_dw.defined());
    const bool m1 = ctx->needs_input_grad(1) && g_dw.defined();
    const bool m2 = ctx->needs_input_grad(2) && g_dx.defined();
    at::Tensor d_grad_out, d_x, d_w;
    if (m0 || m1 || m2) {
      const auto stride = ctx->saved_data["stride"].toIntVector();
      const auto padding = ctx->saved_data["padding"].toIntVector();
      const c10::List<bool> mask = bool_list({m0, m1, m2});
      std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
      if (at::GradMode::is_enabled()) {
        out = public_double_backward(g_dx, g_dw, grad_out, x, w, stride, padding, mask);
      } else {
        out = recorded("fastmeta::task_conv2d_double_backward", "fastmeta_ext::task_conv2d_double_backward", [&] {
          return task_conv2d_double_backward(maybe(g_dx.defined() ? g_dx.contiguous() : g_dx),
                                             maybe(g_dw.defined() ? weight_blocks(g_dw) : g_dw),
                                             grad_out.contiguous(), x, w, stride, padding, mask);
        });
      }
      if (m0) d_grad_out = std::get<0>(out);
      if (m1) d_x = std::get<1>(out);
      if (m2) d_w = std::get<2>(out);
    }
    // One per forward argument: grad_out, x, w, stride, padding, want_dx, want_dw, the addends.
    return {d_grad_out, d_x, d_w, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), d_ax, d_aw};
  }
};

struct TaskConv2dNode : public torch::autograd::Function<TaskConv2dNode> {
  // y = task_conv2d(x, w, b), and an alias of x and of w where asked (outputs_with_aliases).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                               const c10::optional<at::Tensor>& b, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, bool alias_x, bool alias_w) {
    ctx->set_materialize_grads(false);
    at::Tensor y = recorded(nullptr, "fastmeta_ext::task_conv2d", [&] { return task_conv2d(x, w, b, stride, padding); });
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["has_bias"] = b.has_value();
    ctx->saved_data["bias_shared"] = b.has_value() && b->dim() == 1;
    return outputs_with_aliases(ctx, std::move(y), x, w, alias_x, alias_w);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1];
    const at::Tensor grad_y = grads[0];
    const auto [add_x, add_w] = alias_grads(ctx, grads);
    const bool want_dx = ctx->needs_input_grad(0), want_dw = ctx->needs_input_grad(1);
    const at::Tensor none;
    if (!grad_y.defined())  // only the aliases were read: x's and w's gradients are theirs
      return {want_dx ? add_x : none, want_dw ? add_w : none, none, none, none, none, none};
    at::Tensor dx, dw, db;
    if (want_dx || want_dw) {
      const auto stride = ctx->saved_data["stride"].toIntVector();
      const auto padding = ctx->saved_data["padding"].toIntVector();
      const auto ax = want_dx ? maybe(add_x) : c10::nullopt;
      const auto aw = want_dw ? maybe(add_w) : c10::nullopt;
      if (at::GradMode::is_enabled()) {
        const variable_list out = TaskConv2dBackwardNode::apply(grad_y, x, w, stride, padding, want_dx, want_dw, ax, aw);
        dx = out[0];
        dw = out[1];
      } else {
        std::tie(dx, dw) = recorded("fastmeta::task_conv2d_backward", "fastmeta_ext::task_conv2d_backward", [&] {
          return task_conv2d_backward(grad_y.contiguous(), x, w, stride, padding, bool_list({want_dx, want_dw}),
                                      contiguous(ax), contiguous(aw));
        });
      }
      if (!want_dx) dx = none;
      if (!want_dw) dw = none;
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2))
      db = ctx->saved_data["bias_shared"].toBool() ? grad_y.sum({0, 1, 3, 4}) : grad_y.sum({1, 3, 4});
    // One per forward argument: x, w, b, stride, padding, alias_x, alias_w.
    return {dx, dw, db, none, none, none, none};
  }
};

std::vector<at::Tensor> task_conv2d_node(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& b,
                                         at::IntArrayRef stride, at::IntArrayRef padding, bool alias_x, bool alias_w) {
  return TaskConv2dNode::apply(x, w, b, stride.vec(), padding.vec(), alias_x, alias_w);
}

// task_conv2d_input_grad and task_conv2d_weight_grad called as ops of their own (see the
// same pair in task_linear.cpp): each one's backward is the convolution and the other, on
// the arguments fastmeta/ops/task_conv2d.py's launchers give the kernels; through the
// public ops where the backward itself records (third order).

// A weight or bias for the kernels as fastmeta/ops/task_conv2d.py's _task_blocks lays it
// out: a task stride of 0 → the shared tensor; per-task blocks each contiguous kept as they
// are; anything else a contiguous copy.
at::Tensor task_blocks(const at::Tensor& t, int64_t per_task_dim) {
  if (t.dim() == per_task_dim && t.size(0) > 1 && t.stride(0) == 0) return t[0].contiguous();
  if (t.dim() == per_task_dim && t.size(0) > 0 && t.stride(0) >= 0 && t[0].is_contiguous()) return t;
  return t.contiguous();
}

at::Tensor conv_of(const at::Tensor& x, const at::Tensor& w, const std::vector<int64_t>& stride,
                   const std::vector<int64_t>& padding) {
  if (at::GradMode::is_enabled())
    return public_op_output("fastmeta::task_conv2d", {x, w, c10::IValue(), stride, padding});
  return recorded("fastmeta::task_conv2d", "fastmeta_ext::task_conv2d", [&] {
    return task_conv2d(x.contiguous(), task_blocks(w, 5), c10::nullopt, stride, padding);
  });
}

at::Tensor conv_input_grad_of(const at::Tensor& grad_out, const at::Tensor& w, const std::vector<int64_t>& input_size,
                              const std::vector<int64_t>& stride, const std::vector<int64_t>& padding) {
  if (at::GradMode::is_enabled())
    return public_op_output("fastmeta::task_conv2d_input_grad", {grad_out, w, input_size, stride, padding});
  return recorded("fastmeta::task_conv2d_input_grad", "fastmeta_ext::task_conv2d_input_grad", [&] {
    return task_conv2d_input_grad(grad_out.contiguous(), task_blocks(w, 5), input_size, stride, padding);
  });
}

at::Tensor conv_weight_grad_of(const at::Tensor& grad_out, const at::Tensor& x, const std::vector<int64_t>& kernel_size,
                               const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, bool shared) {
  if (at::GradMode::is_enabled())
    return public_op_output("fastmeta::task_conv2d_weight_grad", {grad_out, x, kernel_size, stride, padding, shared});
  return recorded("fastmeta::task_conv2d_weight_grad", "fastmeta_ext::task_conv2d_weight_grad", [&] {
    return task_conv2d_weight_grad(grad_out.contiguous(), x.contiguous(), kernel_size, stride, padding, shared);
  });
}

struct TaskConv2dInputGradNode : public torch::autograd::Function<TaskConv2dInputGradNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& w,
                               std::vector<int64_t> input_size, std::vector<int64_t> stride,
                               std::vector<int64_t> padding) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_out, w});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    return {recorded(nullptr, "fastmeta_ext::task_conv2d_input_grad", [&] {
      return task_conv2d_input_grad(grad_out.contiguous(), task_blocks(w, 5), input_size, stride, padding);
    })};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none, &upstream = grads[0];
    // One per forward argument: grad_out, w, input_size, stride, padding.
    if (!upstream.defined()) return {none, none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &w = saved[1];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    at::Tensor d_grad_out, d_w;
    if (ctx->needs_input_grad(0)) d_grad_out = conv_of(upstream, w, stride, padding);
    if (ctx->needs_input_grad(1))
      d_w = conv_weight_grad_of(grad_out, upstream, {w.size(-2), w.size(-1)}, stride, padding, w.dim() == 4);
    return {d_grad_out, d_w, none, none, none};
  }
};

struct TaskConv2dWeightGradNode : public torch::autograd::Function<TaskConv2dWeightGradNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, const at::Tensor& x,
                               std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, bool shared) {
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({grad_out, x});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    return {recorded(nullptr, "fastmeta_ext::task_conv2d_weight_grad", [&] {
      return task_conv2d_weight_grad(grad_out.contiguous(), x.contiguous(), kernel_size, stride, padding, shared);
    })};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor none, &upstream = grads[0];
    // One per forward argument: grad_out, x, kernel_size, stride, padding, shared.
    if (!upstream.defined()) return {none, none, none, none, none, none};
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &grad_out = saved[0], &x = saved[1];
    const auto stride = ctx->saved_data["stride"].toIntVector();
    const auto padding = ctx->saved_data["padding"].toIntVector();
    at::Tensor d_grad_out, d_x;
    if (ctx->needs_input_grad(0)) d_grad_out = conv_of(x, upstream, stride, padding);
    if (ctx->needs_input_grad(1))
      d_x = conv_input_grad_of(grad_out, upstream, {x.size(3), x.size(4)}, stride, padding);
    return {d_grad_out, d_x, none, none, none, none};
  }
};

std::vector<at::Tensor> task_conv2d_input_grad_node(const at::Tensor& grad_out, const at::Tensor& w,
                                                    at::IntArrayRef input_size, at::IntArrayRef stride,
                                                    at::IntArrayRef padding) {
  return TaskConv2dInputGradNode::apply(grad_out, w, input_size.vec(), stride.vec(), padding.vec());
}

std::vector<at::Tensor> task_conv2d_weight_grad_node(const at::Tensor& grad_out, const at::Tensor& x,
                                                     at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                     at::IntArrayRef padding, bool shared) {
  return TaskConv2dWeightGradNode::apply(grad_out, x, kernel_size.vec(), stride.vec(), padding.vec(), shared);
}

// The public task_conv2d_backward's entry to its node (a second-order graph built by hand,
// or a user's own backward op): the node task_conv2d's node builds under create_graph.
std::vector<at::Tensor> task_conv2d_backward_node(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w,
                                                  at::IntArrayRef stride, at::IntArrayRef padding,
                                                  c10::List<bool> output_mask,
                                                  const c10::optional<at::Tensor>& dx_addend,
                                                  const c10::optional<at::Tensor>& dw_addend) {
  TORCH_CHECK_VALUE(output_mask.size() == 2, "task_conv2d_backward: output_mask holds two flags (dx, dw), got ",
                    output_mask.size());
  return TaskConv2dBackwardNode::apply(grad_out, x, w, stride.vec(), padding.vec(), output_mask.get(0),
                                       output_mask.get(1), dx_addend, dw_addend);
}

}  // namespace
}  // namespace cpu
}  // namespace fastmeta

// The eager nodes' entry: defined here (not from the kernel table: it is no kernel, and has
// no reference), implemented as CompositeImplicitAutograd: the function builds its own node.
TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("task_conv2d_node(Tensor x, Tensor w, Tensor? b, int[] stride, int[] padding, bool alias_x, "
        "bool alias_w) -> Tensor[]");
  m.def("task_conv2d_backward_node(Tensor grad_out, Tensor x, Tensor w, int[] stride, int[] padding, "
        "bool[] output_mask, Tensor? dx_addend, Tensor? dw_addend) -> Tensor[]");
  m.def("task_conv2d_input_grad_node(Tensor grad_out, Tensor w, int[] input_size, int[] stride, int[] padding) "
        "-> Tensor[]");
  m.def("task_conv2d_weight_grad_node(Tensor grad_out, Tensor x, int[] kernel_size, int[] stride, int[] padding, "
        "bool shared) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("task_conv2d_node", &fastmeta::cpu::task_conv2d_node);
  m.impl("task_conv2d_backward_node", &fastmeta::cpu::task_conv2d_backward_node);
  m.impl("task_conv2d_input_grad_node", &fastmeta::cpu::task_conv2d_input_grad_node);
  m.impl("task_conv2d_weight_grad_node", &fastmeta::cpu::task_conv2d_weight_grad_node);
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CPU, m) {
  m.impl("task_conv2d", &fastmeta::cpu::task_conv2d);
  m.impl("task_conv2d_input_grad", &fastmeta::cpu::task_conv2d_input_grad);
  m.impl("task_conv2d_weight_grad", &fastmeta::cpu::task_conv2d_weight_grad);
  m.impl("task_conv2d_backward", &fastmeta::cpu::task_conv2d_backward);
  m.impl("task_conv2d_double_backward", &fastmeta::cpu::task_conv2d_double_backward);
}
