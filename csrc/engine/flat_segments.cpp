// The flat buffer's segment views as autograd nodes in C++: what fastmeta/engine/
// task_weights.py's _SplitSegments and _JoinSegments do, with no Python between autograd's
// engine and the ATen calls.
//
// A meta-iteration reads every parameter of every task from one [*lead, P] buffer (θ [P],
// the fast weights [T, P]) through per-segment views, and autograd hands the buffer its
// gradient as one tensor. The Python nodes cost a meta-iteration of W2's structure (18
// segments) about 27 µs per split and about 100 µs per backward join on the 2-core AMD
// EPYC, six splits and five joins per second-order iteration: Python's as_strided per
// segment, the autograd.Function round trip, the engine's call back into Python. Here:
//
//   split_segments(flat, shapes) -> Tensor[]        one view per segment, as one node whose
//                                                   backward is join_segments
//   join_segments(tensors, shapes, lead) -> Tensor  the flat [*lead, P] (a missing tensor:
//                                                   zeros), as one node whose backward is
//                                                   split_segments
//
// `shapes` encodes the layout's segments in order, each as its rank then its sizes:
// [r0, d0_0, .., r1, d1_0, ..]. The nodes are the Python ones rewritten: the same views
// (as_strided with the same sizes, strides and offsets), the same cat, the same zero for a
// segment no gradient reached (one cached 0-dim zero per dtype and device, expanded), so
// every value and gradient is equal bit for bit (tests/engine/test_task_weights.py). The
// calls are ATen views and one cat. Registered CompositeImplicitAutograd (the node is built
// inside), entered from fastmeta/engine/task_weights.py for plain CPU tensors where the
// extension is loaded and nothing intercepts dispatch (native_segment_nodes).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"

namespace fastmeta {
namespace engine {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The decoded layout: each segment's shape, numel and offset in the flat dim.
struct Segments {
  std::vector<int64_t> encoded;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<int64_t> numels, offsets;
  int64_t total = 0;

  explicit Segments(std::vector<int64_t> code) : encoded(std::move(code)) {
    size_t i = 0;
    while (i < encoded.size()) {
      const int64_t rank = encoded[i++];
      TORCH_CHECK_VALUE(rank >= 0 && i + rank <= encoded.size(), "shapes: a segment's rank ", rank,
                        " runs past the encoded list (", encoded.size(), " values)");
      std::vector<int64_t> shape(encoded.begin() + i, encoded.begin() + i + rank);
      i += rank;
      int64_t numel = 1;
      for (int64_t d : shape) {
        TORCH_CHECK_VALUE(d >= 0, "shapes: a negative size ", d);
        numel *= d;
      }
      shapes.push_back(std::move(shape));
      numels.push_back(numel);
      offsets.push_back(total);
      total += numel;
    }
  }

  size_t size() const { return shapes.size(); }
};

// What a join needs besides its tensors: the segments, the lead shape, and which segments
// have a tensor (the node's inputs are the given ones only: autograd's C++ nodes take no
// undefined tensor as an input).
struct JoinSpec {
  const Segments* segments;
  std::vector<int64_t> lead;
  std::vector<int64_t> given;  // 1 where the segment's tensor is given
};

// Per segment, a view of flat [*lead, P]: [*lead, *shape], strides those of flat's lead
// dims then the segment's own row-major strides times flat's last stride, at the segment's
// offset (Layout._shaped_views).
std::vector<at::Tensor> shaped_views(const at::Tensor& flat, const Segments& segments) {
  TORCH_CHECK_VALUE(flat.dim() >= 1 && flat.size(-1) == segments.total, "flat must end in a dim of ",
                    segments.total, " (the layout's parameters), got shape ", flat.sizes());
  const auto lead = flat.sizes().slice(0, flat.dim() - 1);
  const auto lead_strides = flat.strides().slice(0, flat.dim() - 1);
  const int64_t step = flat.stride(-1);
  const int64_t base = flat.storage_offset();
  std::vector<at::Tensor> views;
  views.reserve(segments.size());
  std::vector<int64_t> size, stride;
  for (size_t k = 0; k < segments.size(); ++k) {
    const auto& shape = segments.shapes[k];
    size.assign(lead.begin(), lead.end());
    size.insert(size.end(), shape.begin(), shape.end());
    stride.assign(lead_strides.begin(), lead_strides.end());
    stride.resize(lead_strides.size() + shape.size());
    int64_t running = step;
    for (size_t d = shape.size(); d-- > 0;) {
      stride[lead_strides.size() + d] = running;
      running *= shape[d];
    }
    views.push_back(flat.as_strided(size, stride, base + segments.offsets[k] * step));
  }
  return views;
}

// One 0-dim zero per dtype and device, made once (Python's cached_zero): a segment no
// gradient reached is this zero expanded, with no allocation or fill per pass.
at::Tensor cached_zero(const at::TensorOptions& like) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int>, at::Tensor> zeros;
  const auto key = std::make_tuple(static_cast<int>(like.dtype().toScalarType()),
                                   static_cast<int>(like.device().type()), static_cast<int>(like.device().index()));
  std::lock_guard<std::mutex> guard(mutex);
  auto found = zeros.find(key);
  if (found == zeros.end()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    found = zeros.emplace(key, at::zeros({}, like)).first;
  }
  return found->second;
}

// The flat [*lead, P] of the segments' tensors (a segment not given: zeros), one cat
// (_JoinSegments's forward): where every one is given and there is no lead shape,
// flatten_dense_tensors.
at::Tensor joined(at::TensorList tensors, const JoinSpec& spec) {
  const Segments& segments = *spec.segments;
  TORCH_CHECK_VALUE(spec.given.size() == segments.size(), "join_segments: ", spec.given.size(),
                    " tensors for ", segments.size(), " segments");
  TORCH_CHECK_VALUE(!tensors.empty(), "join_segments: every tensor is missing");
  if (spec.lead.empty() && tensors.size() == segments.size()) return at::flatten_dense_tensors(tensors);
  std::vector<at::Tensor> parts;
  parts.reserve(segments.size());
  std::vector<int64_t> shape(spec.lead);
  shape.push_back(0);
  size_t next = 0;
  for (size_t k = 0; k < segments.size(); ++k) {
    shape.back() = segments.numels[k];
    parts.push_back(spec.given[k] ? tensors[next++].reshape(shape)
                                  : cached_zero(tensors[0].options()).expand(shape));
  }
  return at::cat(parts, -1);
}

// The given ones of `tensors` (defined), and a mask of which were.
at::TensorList given_only(const variable_list& tensors, std::vector<at::Tensor>& kept, std::vector<int64_t>& given) {
  kept.clear();
  given.clear();
  for (const auto& t : tensors) {
    given.push_back(t.defined() ? 1 : 0);
    if (t.defined()) kept.push_back(t);
  }
  return kept;
}

std::vector<int64_t> lead_of(const at::Tensor& flat) {
  const auto lead = flat.sizes().slice(0, flat.dim() - 1);
  return {lead.begin(), lead.end()};
}

struct JoinSegmentsNode;

struct SplitSegmentsNode : public torch::autograd::Function<SplitSegmentsNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& flat, const Segments& segments) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["shapes"] = segments.encoded;
    ctx->saved_data["lead"] = lead_of(flat);
    return shaped_views(flat, segments);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

struct JoinSegmentsNode : public torch::autograd::Function<JoinSegmentsNode> {
  static variable_list forward(AutogradContext* ctx, const JoinSpec& spec, at::TensorList tensors) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["shapes"] = spec.segments->encoded;
    ctx->saved_data["given"] = spec.given;
    return {joined(tensors, spec)};
  }

  // Each given tensor its segment of the flat gradient, as a view (the split node).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto given = ctx->saved_data["given"].toIntVector();
    variable_list out(1);  // the spec's slot, then one per given tensor
    if (!grads[0].defined()) {
      for (int64_t g : given) {
        if (g) out.emplace_back();
      }
      return out;
    }
    const Segments segments(ctx->saved_data["shapes"].toIntVector());
    const variable_list views = SplitSegmentsNode::apply(grads[0], segments);
    for (size_t k = 0; k < given.size(); ++k) {
      if (given[k]) out.push_back(views[k]);
    }
    return out;
  }
};

variable_list SplitSegmentsNode::backward(AutogradContext* ctx, variable_list grads) {
  bool any = false;
  for (const auto& g : grads) any = any || g.defined();
  if (!any) return {at::Tensor(), at::Tensor()};
  const Segments segments(ctx->saved_data["shapes"].toIntVector());
  JoinSpec spec{&segments, ctx->saved_data["lead"].toIntVector(), {}};
  std::vector<at::Tensor> kept;
  const at::TensorList tensors = given_only(grads, kept, spec.given);
  return {JoinSegmentsNode::apply(spec, tensors)[0], at::Tensor()};
}

std::vector<at::Tensor> split_segments(const at::Tensor& flat, at::IntArrayRef shapes) {
  const Segments segments(shapes.vec());
  return SplitSegmentsNode::apply(flat, segments);
}

at::Tensor join_segments(at::ArrayRef<c10::optional<at::Tensor>> tensors, at::IntArrayRef shapes,
                         at::IntArrayRef lead) {
  const Segments segments(shapes.vec());
  variable_list all;
  all.reserve(tensors.size());
  for (const auto& t : tensors) all.push_back(t.has_value() ? *t : at::Tensor());
  JoinSpec spec{&segments, lead.vec(), {}};
  std::vector<at::Tensor> kept;
  const at::TensorList given = given_only(all, kept, spec.given);
  return JoinSegmentsNode::apply(spec, given)[0];
}

}  // namespace
}  // namespace engine
}  // namespace fastmeta

TORCH_LIBRARY_FRAGMENT(fastmeta_ext, m) {
  m.def("split_segments(Tensor flat, int[] shapes) -> Tensor[]");
  m.def("join_segments(Tensor?[] tensors, int[] shapes, int[] lead) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("split_segments", &fastmeta::engine::split_segments);
  m.impl("join_segments", &fastmeta::engine::join_segments);
}
