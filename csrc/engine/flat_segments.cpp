// The flat buffer's segment views as autograd nodes in C++: what fastmeta/engine/
// task_weights.py's _SplitSegments and _JoinSegments do, with no Python between autograd's
// engine and the ATen calls; the inner step over the inner gradient's segments
// (segment_inner_step) and θ's segments expanded over the tasks (expand_segments), below.
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
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "../common.h"
#include "../cpu/eager_nodes.h"

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

// A segment's view of src: [*lead, *shape] with strides lead_strides then the segment's own
// row-major strides times step (src's last stride), at the segment's offset.
at::Tensor segment_view(const at::Tensor& src, at::IntArrayRef lead, at::IntArrayRef lead_strides, int64_t step,
                        const Segments& segments, size_t k) {
  const auto& shape = segments.shapes[k];
  std::vector<int64_t> size(lead.begin(), lead.end()), stride(lead_strides.begin(), lead_strides.end());
  size.insert(size.end(), shape.begin(), shape.end());
  stride.resize(size.size());
  int64_t running = step;
  for (size_t d = shape.size(); d-- > 0;) {
    stride[lead.size() + d] = running;
    running *= shape[d];
  }
  return src.as_strided(size, stride, src.storage_offset() + segments.offsets[k] * step);
}

// Per segment, a view of flat [*lead, P]: [*lead, *shape], strides those of flat's lead
// dims then the segment's own row-major strides times flat's last stride, at the segment's
// offset (Layout._shaped_views).
std::vector<at::Tensor> shaped_views(const at::Tensor& flat, const Segments& segments) {
  TORCH_CHECK_VALUE(flat.dim() >= 1 && flat.size(-1) == segments.total, "flat must end in a dim of ",
                    segments.total, " (the layout's parameters), got shape ", flat.sizes());
  const auto lead = flat.sizes().slice(0, flat.dim() - 1);
  const auto lead_strides = flat.strides().slice(0, flat.dim() - 1);
  std::vector<at::Tensor> views;
  views.reserve(segments.size());
  for (size_t k = 0; k < segments.size(); ++k) {
    views.push_back(segment_view(flat, lead, lead_strides, flat.stride(-1), segments, k));
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

// ---------------------------------------------------------------------------------------
// The inner step over the segments' gradients: θ' = θ − c · g with g given per segment
// ([T, *shape] each, or missing: zeros), one rate c for every parameter (MAML's), written
// into the new [T, P] buffer in one pass. The engine takes it where autograd hands it the
// inner gradient per segment (the views' gradients), so the [T, P] join of those gradients
// (a cat: at OmniglotFC's 32 tasks a 31 MB copy, then read again by inner_step) is never
// made. Its arithmetic is inner_step's (csrc/cpu/inner_step.cpp) element for element:
// θ − c·g, d θ = Σ_t grad_out (shared θ, in task order) or grad_out, d g = −c · grad_out
// (one [T, P] buffer whose segments the gradients are, as the split node's views of the
// joined gradient were), so values and gradients equal the joined path's bit for bit.
// CPU tensors of float32 or float64, contiguous θ ([P] or [T, P]) and lr 0-dim without
// grad (the engine checks: segment_inner_step in fastmeta/engine/task_weights.py). Where
// its backward records (third order) it is built from ATen ops.
// ---------------------------------------------------------------------------------------

struct StepSpec {
  const Segments* segments;
  std::vector<int64_t> given;  // 1 where the segment's gradient is given
  double rate;                 // lr as a double, for the ATen ops of a recording backward
};

// θ' = θ − c · g segment by segment (a missing gradient: θ's values), task by task, into
// dst(k, t): segment k's values of task t. θ is [P] (shared) or [T, P]. One loop for both
// nodes below: segment_inner_step's destination is the [T, P] buffer, segment_steps' one
// tensor per segment.
template <typename T, typename Dst>
void step_forward(const at::Tensor& theta, at::TensorList grads, const StepSpec& spec, T c, int64_t T_, Dst dst) {
  const Segments& seg = *spec.segments;
  const int64_t P = seg.total;
  const bool shared = theta.dim() == 1;
  const T* th = theta.data_ptr<T>();
  std::vector<const T*> rows(seg.size(), nullptr);
  size_t next = 0;
  for (size_t k = 0; k < seg.size(); ++k) {
    if (spec.given[k]) rows[k] = grads[next++].data_ptr<T>();
  }
  at::parallel_for(0, T_, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      for (size_t k = 0; k < seg.size(); ++k) {
        const int64_t n = seg.numels[k];
        const T* const tht = th + (shared ? 0 : t * P) + seg.offsets[k];
        T* const ot = dst(k, t);
        const T* const gt = rows[k] == nullptr ? nullptr : rows[k] + t * n;
        if (gt == nullptr) {
          std::copy(tht, tht + n, ot);
          continue;
        }
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) ot[i] = tht[i] - c * gt[i];
      }
    }
  });
}

// The checked arguments of both nodes: the given gradients (contiguous) into `kept`, and
// the spec (which segments have one, the rate as a double). `op` names the node in errors.
StepSpec checked_step(const char* op, const at::Tensor& theta, at::ArrayRef<c10::optional<at::Tensor>> grads,
                      const Segments& segments, const at::Tensor& lr, std::vector<at::Tensor>& kept) {
  TORCH_CHECK_VALUE(grads.size() == segments.size(), op, ": ", grads.size(), " gradients for ", segments.size(),
                    " segments");
  StepSpec spec{&segments, {}, 0.0};
  for (const auto& g : grads) {
    const bool has = g.has_value() && g->defined();
    spec.given.push_back(has ? 1 : 0);
    if (has) kept.push_back(g->contiguous());
  }
  TORCH_CHECK_VALUE(!kept.empty(), op, ": every gradient is missing");
  const int64_t T_ = kept[0].size(0);
  size_t next = 0;
  for (size_t k = 0; k < segments.size(); ++k) {
    if (!spec.given[k]) continue;
    const at::Tensor& g = kept[next++];
    TORCH_CHECK_VALUE(g.device().is_cpu() && g.scalar_type() == theta.scalar_type() && g.dim() >= 1 &&
                          g.size(0) == T_ && g.numel() == T_ * segments.numels[k],
                      op, ": gradient ", k, " must be a CPU [", T_, ", ...] tensor of ", segments.numels[k],
                      " values per task of theta's dtype, got ", g.sizes());
  }
  TORCH_CHECK_VALUE(theta.device().is_cpu() && theta.is_contiguous() &&
                        (theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble) &&
                        ((theta.dim() == 1 && theta.size(0) == segments.total) ||
                         (theta.dim() == 2 && theta.size(0) == T_ && theta.size(1) == segments.total)),
                    op, ": theta must be a contiguous CPU float [P] or [T, P] with P = ", segments.total, ", got ",
                    theta.sizes());
  TORCH_CHECK_VALUE(lr.dim() == 0 && lr.scalar_type() == theta.scalar_type() && !lr.requires_grad(), op,
                    ": lr must be a 0-dim tensor of theta's dtype that needs no gradient");
  spec.rate = lr.scalar_type() == at::kDouble ? lr.data_ptr<double>()[0] : double(lr.data_ptr<float>()[0]);
  return spec;
}

// d θ (shared: Σ_t grad_out in task order, as inner_step_backward sums it) and d g = −c ·
// grad_out, each where asked; without a recording backward.
template <typename T>
void step_backward(const at::Tensor& grad_out, T c, at::Tensor* d_theta_shared, at::Tensor* d_grad) {
  const int64_t T_ = grad_out.size(0), P = grad_out.size(1);
  const T* go = grad_out.data_ptr<T>();
  T* dth = d_theta_shared ? d_theta_shared->data_ptr<T>() : nullptr;
  T* dg = d_grad ? d_grad->data_ptr<T>() : nullptr;
  constexpr int64_t kColumns = 16384;
  at::parallel_for(0, P, kColumns, [&, go, dth, dg, c](int64_t p0, int64_t p1) {
    const T* const go_ = go;
    T* const dth_ = dth;
    T* const dg_ = dg;
    const T c_ = c;
    if (dth_) std::fill(dth_ + p0, dth_ + p1, T(0));
    for (int64_t b0 = p0; b0 < p1; b0 += kColumns) {
      const int64_t b1 = std::min(p1, b0 + kColumns);
      for (int64_t t = 0; t < T_; ++t) {
        const T* const got = go_ + t * P;
        if (dg_ && dth_) {
          T* const dgt = dg_ + t * P;
#pragma omp simd
          for (int64_t p = b0; p < b1; ++p) {
            dgt[p] = -c_ * got[p];
            dth_[p] += got[p];
          }
        } else if (dg_) {
          T* const dgt = dg_ + t * P;
#pragma omp simd
          for (int64_t p = b0; p < b1; ++p) dgt[p] = -c_ * got[p];
        } else {
#pragma omp simd
          for (int64_t p = b0; p < b1; ++p) dth_[p] += got[p];
        }
      }
    }
  });
}

struct SegmentInnerStepNode : public torch::autograd::Function<SegmentInnerStepNode> {
  // inputs: theta (edge 0), lr (not differentiable here: no edge wanted), the given
  // gradients (edges 2...).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& theta, const at::Tensor& lr,
                               const StepSpec& spec, at::TensorList grads) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["shapes"] = spec.segments->encoded;
    ctx->saved_data["given"] = spec.given;
    ctx->saved_data["rate"] = spec.rate;
    ctx->saved_data["theta_shared"] = theta.dim() == 1;
    ctx->save_for_backward({lr});
    const int64_t T_ = grads[0].size(0);
    at::Tensor out = at::empty({T_, spec.segments->total}, theta.options());
    // Recorded as the op it stands for (the dispatch counter counts one inner_step).
    cpu::eager_nodes::recorded("fastmeta::inner_step", "fastmeta_ext::inner_step", [&] {
      const int64_t P = spec.segments->total;
      const auto& offsets = spec.segments->offsets;
      AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "segment_inner_step", [&] {
        scalar_t* o = out.data_ptr<scalar_t>();
        step_forward<scalar_t>(theta, grads, spec, lr.data_ptr<scalar_t>()[0], T_,
                               [&](size_t k, int64_t t) { return o + t * P + offsets[k]; });
      });
      return 0;
    });
    return {out};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto given = ctx->saved_data["given"].toIntVector();
    int64_t n_given = 0;
    for (int64_t g : given) n_given += g;
    variable_list out(3 + n_given);  // theta, lr, the spec's slot, then the given gradients
    const at::Tensor& grad_out_ = grads[0];
    if (!grad_out_.defined()) return out;
    const bool need_theta = ctx->needs_input_grad(0);
    bool need_grads = false;
    for (int64_t e = 0; e < n_given; ++e) need_grads = need_grads || ctx->needs_input_grad(2 + e);
    if (!need_theta && !need_grads) return out;
    const bool shared = ctx->saved_data["theta_shared"].toBool();
    const at::Tensor lr = ctx->get_saved_variables()[0];
    const at::Tensor grad_out = grad_out_.contiguous();
    at::Tensor d_theta, d_grad;
    if (at::GradMode::is_enabled()) {  // a recording backward (third order): ATen ops
      if (need_theta) d_theta = shared ? grad_out.sum(0) : grad_out.clone();
      if (need_grads) d_grad = at::mul(grad_out, -ctx->saved_data["rate"].toDouble());
    } else {
      cpu::eager_nodes::recorded("fastmeta::inner_step_backward", "fastmeta_ext::inner_step_backward", [&] {
        if (need_theta && !shared) {  // a copy, as inner_step_backward's (no aten op: no dispatch)
          d_theta = at::empty_like(grad_out);
          std::memcpy(d_theta.data_ptr(), grad_out.data_ptr(), grad_out.numel() * grad_out.element_size());
        }
        at::Tensor shared_sum =
            need_theta && shared ? at::empty({grad_out.size(1)}, grad_out.options()) : at::Tensor();
        if (need_grads) d_grad = at::empty_like(grad_out);
        if (shared_sum.defined() || d_grad.defined()) {
          if (grad_out.scalar_type() == at::kDouble) {
            step_backward<double>(grad_out, lr.data_ptr<double>()[0], shared_sum.defined() ? &shared_sum : nullptr,
                                  d_grad.defined() ? &d_grad : nullptr);
          } else {
            step_backward<float>(grad_out, lr.data_ptr<float>()[0], shared_sum.defined() ? &shared_sum : nullptr,
                                 d_grad.defined() ? &d_grad : nullptr);
          }
        }
        if (shared_sum.defined()) d_theta = shared_sum;
        return 0;
      });
    }
    out[0] = d_theta;
    if (d_grad.defined()) {
      const Segments segments(ctx->saved_data["shapes"].toIntVector());
      const auto views = shaped_views(d_grad, segments);
      int64_t e = 0;
      for (size_t k = 0; k < given.size(); ++k) {
        if (!given[k]) continue;
        if (ctx->needs_input_grad(2 + e)) out[3 + e] = views[k];
        ++e;
      }
    }
    return out;
  }
};

at::Tensor segment_inner_step(const at::Tensor& theta, at::ArrayRef<c10::optional<at::Tensor>> grads,
                              at::IntArrayRef shapes, const at::Tensor& lr) {
  const Segments segments(shapes.vec());
  std::vector<at::Tensor> kept;
  const StepSpec spec = checked_step("segment_inner_step", theta, grads, segments, lr, kept);
  return SegmentInnerStepNode::apply(theta, lr, spec, at::TensorList(kept))[0];
}

// ---------------------------------------------------------------------------------------
// The same step returning the new fast weights per segment (segment_steps): [T, *shape]
// each, which the last query's layers read as they are. So the query's gradient reaches the
// step per segment too, and no [T, P] join of it (a cat: at OmniglotFC's 32 tasks a 31 MB
// copy, written and read again by the step's backward) is made. θ is [P] (shared: the
// first step) or [T, P] (the previous step's buffer). The backward per segment: d g_k =
// −c · grad_k, and d θ's segment k = Σ_t grad_k (shared, in task order) or grad_k itself
// (written into the [T, P] gradient, where segment_inner_step's backward copied the joined
// one). The engine takes it for the last inner step only: an earlier step's fast weights are
// also read by the next step, and per segment autograd would sum those two gradients
// segment by segment (an add each). Values and gradients are those of segment_inner_step
// followed by the split node, element for element.
// ---------------------------------------------------------------------------------------

// One segment's backward: g [T, n] contiguous. d θ's segment: Σ_t g into sum_out [n] (task
// order), or g's rows into the [T, P] gradient at rows_out (row stride P); d g = −c · g into
// d where given.
template <typename T>
void segment_step_backward(const at::Tensor& g, T c, T* sum_out, T* rows_out, int64_t P, at::Tensor* d) {
  const int64_t T_ = g.size(0), n = g.numel() / std::max<int64_t>(T_, 1);
  const T* gp = g.data_ptr<T>();
  T* dp = d != nullptr ? d->data_ptr<T>() : nullptr;
  if (sum_out != nullptr) std::fill(sum_out, sum_out + n, T(0));
  for (int64_t t = 0; t < T_; ++t) {
    const T* __restrict gt = gp + t * n;
    if (sum_out != nullptr) {
      T* __restrict so = sum_out;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) so[i] += gt[i];
    }
    if (rows_out != nullptr) std::copy(gt, gt + n, rows_out + t * P);
    if (dp != nullptr) {
      T* __restrict dt = dp + t * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dt[i] = -c * gt[i];
    }
  }
}

struct SegmentStepsNode : public torch::autograd::Function<SegmentStepsNode> {
  // inputs: theta (edge 0), lr (no edge wanted), the spec's slot, the given gradients.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& theta, const at::Tensor& lr,
                               const StepSpec& spec, at::TensorList grads) {
    ctx->set_materialize_grads(false);
    const Segments& seg = *spec.segments;
    ctx->saved_data["shapes"] = seg.encoded;
    ctx->saved_data["given"] = spec.given;
    ctx->saved_data["rate"] = spec.rate;
    ctx->saved_data["theta_shared"] = theta.dim() == 1;
    ctx->save_for_backward({lr});
    const int64_t T_ = grads[0].size(0);
    std::vector<at::Tensor> outs;
    outs.reserve(seg.size());
    for (size_t k = 0; k < seg.size(); ++k) {
      std::vector<int64_t> size{T_};
      size.insert(size.end(), seg.shapes[k].begin(), seg.shapes[k].end());
      outs.push_back(at::empty(size, theta.options()));
    }
    // Recorded as the op it stands for (the dispatch counter counts one inner_step).
    cpu::eager_nodes::recorded("fastmeta::inner_step", "fastmeta_ext::inner_step", [&] {
      AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "segment_steps", [&] {
        std::vector<scalar_t*> dst;
        for (auto& o : outs) dst.push_back(o.data_ptr<scalar_t>());
        step_forward<scalar_t>(theta, grads, spec, lr.data_ptr<scalar_t>()[0], T_,
                               [&](size_t k, int64_t t) { return dst[k] + t * seg.numels[k]; });
      });
      return 0;
    });
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto given = ctx->saved_data["given"].toIntVector();
    const bool shared = ctx->saved_data["theta_shared"].toBool();
    const Segments seg(ctx->saved_data["shapes"].toIntVector());
    int64_t n_given = 0;
    for (int64_t g : given) n_given += g;
    variable_list out(3 + n_given);  // theta, lr, the spec's slot, then the given gradients
    const at::Tensor* like = nullptr;
    for (const auto& g : grads) {
      if (g.defined()) {
        like = &g;
        break;
      }
    }
    if (like == nullptr) return out;
    const double rate = ctx->saved_data["rate"].toDouble();
    const at::Tensor lr = ctx->get_saved_variables()[0];
    const bool need_theta = ctx->needs_input_grad(0);
    const bool recording = at::GradMode::is_enabled();  // third order: ATen ops
    const int64_t T_ = like->size(0), P = seg.total;
    at::Tensor d_theta;
    if (need_theta && !recording) d_theta = shared ? at::empty({P}, like->options()) : at::empty({T_, P}, like->options());
    std::vector<at::Tensor> parts;  // the recording backward's d θ, per segment
    int64_t e = 0;
    cpu::eager_nodes::recorded("fastmeta::inner_step_backward", "fastmeta_ext::inner_step_backward", [&] {
      for (size_t k = 0; k < seg.size(); ++k) {
        const at::Tensor& g = grads[k];
        // The returned list has a slot for the spec (2) where autograd's edges do not: a
        // given gradient's edge is its slot minus one.
        const int64_t slot = 3 + e;
        if (given[k]) ++e;
        const bool need_d = given[k] != 0 && g.defined() && ctx->needs_input_grad(slot - 1);
        if (recording) {
          if (need_theta) {
            const at::Tensor zeros = at::zeros(shared ? std::vector<int64_t>{seg.numels[k]}
                                                      : std::vector<int64_t>{T_, seg.numels[k]}, like->options());
            parts.push_back(!g.defined() ? zeros : shared ? g.sum(0).reshape({-1}) : g.reshape({T_, -1}));
          }
          if (need_d) out[slot] = at::mul(g, -rate);
          continue;
        }
        AT_DISPATCH_FLOATING_TYPES(like->scalar_type(), "segment_steps_backward", [&] {
          scalar_t* dth = need_theta ? d_theta.data_ptr<scalar_t>() + seg.offsets[k] : nullptr;
          if (!g.defined()) {  // no gradient reached the segment: zeros in d θ
            for (int64_t t = 0; dth != nullptr && t < (shared ? 1 : T_); ++t)
              std::fill(dth + t * P, dth + t * P + seg.numels[k], scalar_t(0));
            return;
          }
          const at::Tensor gc = g.contiguous();
          at::Tensor d = need_d ? at::empty_like(gc) : at::Tensor();
          segment_step_backward<scalar_t>(gc, lr.data_ptr<scalar_t>()[0], shared ? dth : nullptr,
                                          shared ? nullptr : dth, P, need_d ? &d : nullptr);
          if (need_d) out[slot] = d;
        });
      }
      return 0;
    });
    if (need_theta) out[0] = recording ? at::cat(parts, -1) : d_theta;
    return out;
  }
};

std::vector<at::Tensor> segment_steps(const at::Tensor& theta, at::ArrayRef<c10::optional<at::Tensor>> grads,
                                      at::IntArrayRef shapes, const at::Tensor& lr) {
  const Segments segments(shapes.vec());
  std::vector<at::Tensor> kept;
  const StepSpec spec = checked_step("segment_steps", theta, grads, segments, lr, kept);
  return SegmentStepsNode::apply(theta, lr, spec, at::TensorList(kept));
}

// ---------------------------------------------------------------------------------------
// θ's segments over the tasks without the [T, P] buffer: the first inner step reads θ
// expanded over the tasks (every task starts from θ). Through θ.expand(T, P) and the split
// node, the gradient the meta-gradient sends those views (the inner step's second-order
// terms) is joined into [T, P] (a cat) and summed over the tasks (a second pass); here each
// adapting segment is θ's view expanded to [T, *shape] (a task stride of 0) and each other
// segment θ's own view, in one node, whose backward sums each segment's gradient over the
// tasks straight into d θ [P], in task order: one pass over the gradients, no [T, P]
// buffer. Where its backward records (third order) it is built from ATen ops.
// ---------------------------------------------------------------------------------------

struct ExpandSpec {
  const Segments* segments;
  int64_t tasks;
  std::vector<int64_t> per_task;  // 1 where the segment is expanded over the tasks
};

std::vector<at::Tensor> expanded_views(const at::Tensor& theta, const ExpandSpec& spec) {
  const Segments& seg = *spec.segments;
  TORCH_CHECK_VALUE(theta.dim() == 1 && theta.size(0) == seg.total && theta.is_contiguous(),
                    "expand_segments: theta must be a contiguous [", seg.total, "], got ", theta.sizes());
  TORCH_CHECK_VALUE(spec.per_task.size() == seg.size(), "expand_segments: ", spec.per_task.size(),
                    " flags for ", seg.size(), " segments");
  const std::vector<int64_t> tasks{spec.tasks}, task_stride{0};
  std::vector<at::Tensor> views;
  views.reserve(seg.size());
  for (size_t k = 0; k < seg.size(); ++k) {
    views.push_back(spec.per_task[k] ? segment_view(theta, tasks, task_stride, 1, seg, k)
                                     : segment_view(theta, {}, {}, 1, seg, k));
  }
  return views;
}

template <typename T>
void sum_segments(const variable_list& grads, const Segments& seg, const std::vector<int64_t>& per_task,
                  int64_t tasks, at::Tensor& out) {
  T* o = out.data_ptr<T>();
  for (size_t k = 0; k < seg.size(); ++k) {
    const int64_t n = seg.numels[k], off = seg.offsets[k];
    T* const ok = o + off;
    if (!grads[k].defined()) {
      std::fill(ok, ok + n, T(0));
      continue;
    }
    const at::Tensor g = grads[k].contiguous();
    const T* const gk = g.data_ptr<T>();
    if (!per_task[k]) {
      std::copy(gk, gk + n, ok);
      continue;
    }
    std::copy(gk, gk + n, ok);
    for (int64_t t = 1; t < tasks; ++t) {
      const T* const gt = gk + t * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) ok[i] += gt[i];
    }
  }
}

struct ExpandSegmentsNode : public torch::autograd::Function<ExpandSegmentsNode> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& theta, const ExpandSpec& spec) {
    ctx->set_materialize_grads(false);
    ctx->saved_data["shapes"] = spec.segments->encoded;
    ctx->saved_data["per_task"] = spec.per_task;
    ctx->saved_data["tasks"] = spec.tasks;
    return expanded_views(theta, spec);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    bool any = false;
    for (const auto& g : grads) any = any || g.defined();
    if (!any || !ctx->needs_input_grad(0)) return {at::Tensor(), at::Tensor()};
    const Segments seg(ctx->saved_data["shapes"].toIntVector());
    const auto per_task = ctx->saved_data["per_task"].toIntVector();
    const int64_t tasks = ctx->saved_data["tasks"].toInt();
    const at::Tensor* like = nullptr;
    for (const auto& g : grads) {
      if (g.defined()) {
        like = &g;
        break;
      }
    }
    if (at::GradMode::is_enabled()) {  // a recording backward (third order): ATen ops
      std::vector<at::Tensor> parts;
      for (size_t k = 0; k < seg.size(); ++k) {
        if (!grads[k].defined()) {
          parts.push_back(at::zeros({seg.numels[k]}, like->options()));
        } else {
          parts.push_back((per_task[k] ? grads[k].sum(0) : grads[k]).reshape({-1}));
        }
      }
      return {at::cat(parts), at::Tensor()};
    }
    at::Tensor out = at::empty({seg.total}, like->options());
    cpu::eager_nodes::recorded(nullptr, "fastmeta_ext::sum_segments", [&] {
      if (out.scalar_type() == at::kDouble) {
        sum_segments<double>(grads, seg, per_task, tasks, out);
      } else {
        sum_segments<float>(grads, seg, per_task, tasks, out);
      }
      return 0;
    });
    return {out, at::Tensor()};
  }
};

std::vector<at::Tensor> expand_segments(const at::Tensor& theta, at::IntArrayRef shapes, int64_t tasks,
                                        at::IntArrayRef per_task) {
  const Segments segments(shapes.vec());
  TORCH_CHECK_VALUE(theta.device().is_cpu() && (theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble),
                    "expand_segments: theta must be a CPU float32 or float64 tensor");
  TORCH_CHECK_VALUE(tasks >= 1, "expand_segments: tasks must be at least 1, got ", tasks);
  const ExpandSpec spec{&segments, tasks, per_task.vec()};
  return ExpandSegmentsNode::apply(theta, spec);
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
  m.def("segment_inner_step(Tensor theta, Tensor?[] grads, int[] shapes, Tensor lr) -> Tensor");
  m.def("expand_segments(Tensor theta, int[] shapes, int tasks, int[] per_task) -> Tensor[]");
  m.def("segment_steps(Tensor theta, Tensor?[] grads, int[] shapes, Tensor lr) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fastmeta_ext, CompositeImplicitAutograd, m) {
  m.impl("split_segments", &fastmeta::engine::split_segments);
  m.impl("join_segments", &fastmeta::engine::join_segments);
  m.impl("segment_inner_step", &fastmeta::engine::segment_inner_step);
  m.impl("expand_segments", &fastmeta::engine::expand_segments);
  m.impl("segment_steps", &fastmeta::engine::segment_steps);
}
