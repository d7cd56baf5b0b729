// Shared by the CPU and CUDA sources of the fastmeta_ext extension: argument checks and
// the small enums that the string arguments of the ops (act, kind) map onto.
//
// The checks guard memory: the Python launchers in fastmeta/backends/extension.py only
// call these ops with inputs they have already normalised (contiguous, stride-0 task
// dims collapsed, a supported dtype), so a failing check here is a bug in a launcher, and
// it must raise instead of reading out of bounds.
//
// Each check raises the Python exception of its kind, chosen here rather than by the
// message's text: TORCH_CHECK_TYPE (TypeError) for a dtype, TORCH_CHECK_VALUE (ValueError)
// for a shape, device, layout or value (labels out of range included), TORCH_CHECK_INDEX
// (IndexError) for an index into another argument, and TORCH_CHECK_NOT_IMPLEMENTED
// (NotImplementedError) for an argument that is valid but beyond what a kernel handles
// (an activation, a size limit). Plain TORCH_CHECK (RuntimeError) is left for invariants
// no argument can break. A non-finite value is not an argument error: the fused meta-step
// reports it in an output of its own (csrc/cpu/mlp_meta_step.cpp, NonFinite), and the op
// raises FloatingPointError from that.
#pragma once

#include <type_traits>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#define FM_CHECK_DEVICE(x, dev) \
  TORCH_CHECK_VALUE((x).device().type() == (dev), #x " must be on ", (dev), ", got ", (x).device())
#define FM_CHECK_CONTIGUOUS(x) TORCH_CHECK_VALUE((x).is_contiguous(), #x " must be contiguous")
#define FM_CHECK_DIM(x, d) \
  TORCH_CHECK_VALUE((x).dim() == (d), #x " must have ", (d), " dims, got shape ", (x).sizes())
#define FM_CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK_TYPE((x).scalar_type() == (y).scalar_type(), #x " and " #y " must share a dtype, got ", \
              (x).scalar_type(), " and ", (y).scalar_type())
#define FM_CHECK_FLOATING(x) \
  TORCH_CHECK_TYPE((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kDouble, \
              #x " must be float32 or float64, got ", (x).scalar_type())
// The usual triple: device, contiguity, dtype.
#define FM_CHECK_INPUT(x, dev) \
  FM_CHECK_DEVICE(x, dev);     \
  FM_CHECK_CONTIGUOUS(x)

namespace fastmeta {

// Calls f(float{}) or f(double{}) by dtype. Used instead of AT_DISPATCH_FLOATING_TYPES
// because the kernels' loops carry `#pragma omp simd`, and a pragma may not appear inside
// a macro argument (the dispatch macro's lambda is one).
template <typename F>
inline void dispatch_floating(at::ScalarType st, const char* name, F&& f) {
  if (st == at::kFloat) {
    f(float{});
  } else if (st == at::kDouble) {
    f(double{});
  } else {
    TORCH_CHECK_TYPE(false, name, ": float32 or float64 expected, got ", st);
  }
}

// Activations fused into the kernels; the numbering is shared with the CUDA kernels.
enum class Act : int { None = 0, Relu = 1, LeakyRelu = 2, Tanh = 3, Sigmoid = 4 };

inline Act parse_act(const std::string& act) {
  if (act == "none") return Act::None;
  if (act == "relu") return Act::Relu;
  if (act == "leaky_relu") return Act::LeakyRelu;
  if (act == "tanh") return Act::Tanh;
  if (act == "sigmoid") return Act::Sigmoid;
  TORCH_CHECK_VALUE(false, "act must be one of none|relu|leaky_relu|tanh|sigmoid, got '", act, "'");
}

// An activation as a type: a loop written against ActConstant<A> folds act_forward's and
// act_derivative_from_output's switch away and vectorises (with a runtime Act, the switch
// per element kept the CPU BatchNorm loops scalar: W2's first BatchNorm backward took 37 ms
// with relu against 5 ms without).
template <Act A>
using ActConstant = std::integral_constant<Act, A>;

// Calls f(ActConstant<act>{}) for the piecewise-linear activations and none (what the
// backward kernels take), or for every activation when smooth is true.
template <typename F>
inline void dispatch_act(Act act, bool smooth, F&& f) {
  switch (act) {
    case Act::None: return f(ActConstant<Act::None>{});
    case Act::Relu: return f(ActConstant<Act::Relu>{});
    case Act::LeakyRelu: return f(ActConstant<Act::LeakyRelu>{});
    case Act::Tanh:
      if (smooth) return f(ActConstant<Act::Tanh>{});
      break;
    case Act::Sigmoid:
      if (smooth) return f(ActConstant<Act::Sigmoid>{});
      break;
  }
  TORCH_CHECK_VALUE(false, "activation ", static_cast<int>(act), " is not implemented here");
}

enum class LossKind : int { CrossEntropy = 0, Mse = 1 };

inline LossKind parse_loss(const std::string& kind) {
  if (kind == "cross_entropy") return LossKind::CrossEntropy;
  if (kind == "mse") return LossKind::Mse;
  TORCH_CHECK_VALUE(false, "kind must be cross_entropy or mse, got '", kind, "'");
}

// f(z) and f'(z) written in y = f(z) (see fastmeta/ops/activation.py for the table).
template <typename T>
inline T act_forward(T z, Act act, T slope) {
  switch (act) {
    // NaN passes through, as torch.relu lets it: a NaN input must not become a clean 0.
    case Act::Relu: return (z > T(0) || z != z) ? z : T(0);
    case Act::LeakyRelu: return z > T(0) ? z : z * slope;
    case Act::Tanh: return std::tanh(z);
    case Act::Sigmoid: return T(1) / (T(1) + std::exp(-z));
    default: return z;
  }
}

template <typename T>
inline T act_derivative_from_output(T y, Act act, T slope) {
  switch (act) {
    case Act::Relu: return y > T(0) ? T(1) : T(0);
    case Act::LeakyRelu: return y > T(0) ? T(1) : slope;
    case Act::Tanh: return T(1) - y * y;
    case Act::Sigmoid: return y * (T(1) - y);
    default: return T(1);
  }
}

}  // namespace fastmeta
