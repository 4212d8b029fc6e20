// sample_from_uniforms on the CPU: images in parallel, each one matched,
// keyed by its overlaps (x-sweep) and sampled by its strategies. The steps
// and their tie-breaks are those of docs/ops.md, shared with the CUDA kernel
// through sampling_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "overlap_sweep.h"
#include "sample_options.h"
#include "sampling_math.h"
#include "select_top.h"
#include "vector_clones.h"

namespace overlap_sampler {
namespace {

// Where one image's results go.
struct OutputRow {
  int64_t* indices;
  int64_t* matched_gt;
  float* weights;
  int64_t* num_pos;
  int64_t* num_neg;
};

// Per-thread scratch, reused from image to image.
template <typename T>
class ImageSampler {
 public:
  ImageSampler(const SampleOptions& options, const T* proposals, const T* gt_boxes,
               const double* uniforms, int64_t num_proposals)
      : o_(options),
        proposals_(proposals),
        gt_boxes_(gt_boxes),
        uniforms_(uniforms),
        num_proposals_(num_proposals) {}

  void run(int64_t p_begin, int64_t p_end, int64_t g_begin, int64_t g_end, OutputRow out) {
    load_examples(p_begin, p_end, g_begin, g_end);
    match(g_begin, g_end);
    const int64_t qp = std::min<int64_t>(o_.positive_quota, static_cast<int64_t>(pos_.size()));
    const int64_t qn = std::min<int64_t>(o_.batch_size_per_image - qp,
                                         static_cast<int64_t>(neg_.size()));
    std::fill(selected_.begin(), selected_.end(), char(0));
    // A class that fits its quota is taken whole: no keys needed.
    const bool negatives_drawn = qn > 0 && qn < static_cast<int64_t>(neg_.size());
    const bool positives_drawn = qp > 0 && qp < static_cast<int64_t>(pos_.size());
    // IoU_p,n keys on both sides are maxima over the same pairs: one pass.
    const bool fused = negatives_drawn && positives_drawn && overlap_keys_on_both_sides();
    if (fused) compute_both_keys();
    if (qn == static_cast<int64_t>(neg_.size())) {
      for (const int64_t e : neg_) selected_[e] = 1;
    } else if (qn > 0) {
      if (!fused) compute_negative_keys();
      select(neg_, o_.neg_strategy, qn);
    }
    if (qp == static_cast<int64_t>(pos_.size())) {
      for (const int64_t e : pos_) selected_[e] = 1;
    } else if (qp > 0) {
      if (!fused) compute_positive_keys();
      select(pos_, o_.pos_strategy, qp);
    }
    write(out, g_begin, g_end, qp, qn);
  }

 private:
  void load_examples(int64_t p_begin, int64_t p_end, int64_t g_begin, int64_t g_end) {
    num_local_proposals_ = p_end - p_begin;
    const int64_t copies = o_.append_gt ? g_end - g_begin : 0;
    const int64_t count = num_local_proposals_ + copies;
    boxes_.assign(proposals_ + 4 * p_begin, proposals_ + 4 * p_end);
    if (copies > 0) boxes_.insert(boxes_.end(), gt_boxes_ + 4 * g_begin, gt_boxes_ + 4 * g_end);
    example_id_.resize(count);
    for (int64_t e = 0; e < count; ++e) {
      example_id_[e] = e < num_local_proposals_ ? p_begin + e
                                                : num_proposals_ + g_begin + (e - num_local_proposals_);
    }
    iou_gt_.resize(count);
    matched_.resize(count);
    key_.assign(count, 0.0);
    selected_.resize(count);
    column_.resize(count);
  }

  // IoU_g,e, matched GT and the label of every example. GT-major: one
  // branch-free pass over the proposals per GT, over one array per
  // coordinate, so the compiler vectorises it. Visiting GTs in ascending
  // order and replacing only on a larger IoU (or the first, 0) is
  // update_max's lowest-index tie rule.
  OS_VECTOR_CLONES void match(int64_t g_begin, int64_t g_end) {
    const T fg = static_cast<T>(o_.fg_iou_thresh);
    const T bg = static_cast<T>(o_.bg_iou_thresh);
    const int64_t n = num_local_proposals_;
    x1_.resize(n);
    y1_.resize(n);
    x2_.resize(n);
    y2_.resize(n);
    area_.resize(n);
    for (int64_t e = 0; e < n; ++e) {
      const T* box = boxes_.data() + 4 * e;
      x1_[e] = box[0];
      y1_[e] = box[1];
      x2_[e] = box[2];
      y2_[e] = box[3];
      area_[e] = box_area(box);
    }
    // The matched GT as an int32 offset from g_begin (-1: none yet): float and
    // int32 lanes have one width, and SSE2 compares int32 (not int64).
    best_gt_offset_.assign(n, -1);
    int32_t* best_gt = best_gt_offset_.data();
    T* best = iou_gt_.data();
    std::fill_n(best, n, T(0));
    const T* x1 = x1_.data();
    const T* y1 = y1_.data();
    const T* x2 = x2_.data();
    const T* y2 = y2_.data();
    const T* area = area_.data();
    for (int64_t g = g_begin; g < g_end; ++g) {
      const T* gt = gt_boxes_ + 4 * g;
      const T gx1 = gt[0], gy1 = gt[1], gx2 = gt[2], gy2 = gt[3];
      const T g_area = box_area(gt);
      const int32_t offset = static_cast<int32_t>(g - g_begin);
#pragma omp simd
      for (int64_t e = 0; e < n; ++e) {
        // box_iou_pair(proposal, gt).
        const T iou = box_iou_unpacked(x1[e], y1[e], x2[e], y2[e], area[e], gx1, gy1, gx2, gy2, g_area);
        // Bitwise, not short-circuit: no branch, so the loop vectorises.
        const bool take = (iou > best[e]) | ((iou == best[e]) & (best_gt[e] < 0));
        best[e] = take ? iou : best[e];
        best_gt[e] = take ? offset : best_gt[e];
      }
    }
    for (int64_t e = 0; e < n; ++e) matched_[e] = best_gt[e] < 0 ? -1 : g_begin + best_gt[e];
    const int64_t count = static_cast<int64_t>(example_id_.size());
    for (int64_t e = n; e < count; ++e) {
      // A GT copy is matched to its own row (even if another GT is identical).
      const T* box = boxes_.data() + 4 * e;
      iou_gt_[e] = box_iou_pair(box, box);
      matched_[e] = g_begin + (e - n);
    }
    pos_.clear();
    neg_.clear();
    for (int64_t e = 0; e < count; ++e) {
      if (e >= n || (matched_[e] >= 0 && iou_gt_[e] >= fg)) {
        pos_.push_back(e);
      } else if (iou_gt_[e] < bg) {
        neg_.push_back(e);
      }
    }
  }

  // IoU_p,n of each negative (or its IoU_g,n for iou_balanced).
  void compute_negative_keys() {
    if (o_.neg_strategy == kUniform) return;
    if (o_.neg_strategy == kIouBalanced) {
      for (const int64_t e : neg_) key_[e] = static_cast<double>(iou_gt_[e]);
      return;
    }
    overlaps_with(neg_, pos_, /*exclude_self=*/false);
  }

  // The positive key: max IoU with the image's negatives, or with every other
  // example (pos_key="all").
  void compute_positive_keys() {
    if (o_.pos_strategy == kUniform) return;
    if (o_.pos_key_all) {
      all_.resize(example_id_.size());
      for (int64_t e = 0; e < static_cast<int64_t>(all_.size()); ++e) all_[e] = e;
      overlaps_with(pos_, all_, /*exclude_self=*/true);
    } else {
      overlaps_with(pos_, neg_, /*exclude_self=*/false);
    }
  }

  // Negatives keyed by IoU_p,n and positives by their max IoU with the negatives.
  bool overlap_keys_on_both_sides() const {
    return o_.neg_strategy != kUniform && o_.neg_strategy != kIouBalanced &&
           o_.pos_strategy != kUniform && !o_.pos_key_all;
  }

  // compute_negative_keys and compute_positive_keys in one pass over the
  // positive-negative pairs: the NaN-free negatives are swept, and each
  // NaN-free positive's pass over the negatives it can meet raises their
  // maxima and yields its own key. Bit for bit the two-pass keys: IoU is
  // symmetric for boxes without NaN (min/max and the area sum commute), and a
  // NaN box, as the second box of a pair, raises no max (see OverlapSweep).
  // Boxes with a NaN are keyed as in overlaps_with, against every other box.
  void compute_both_keys() {
    keep_nan_free(neg_, pos_, /*exclude_self=*/false);
    finite_keys_.swap(finite_queries_);  // the NaN-free negatives
    keep_nan_free(pos_, neg_, /*exclude_self=*/false);
    finite_keys_.swap(finite_queries_);  // finite_keys_: positives, finite_queries_: negatives
    const std::vector<int64_t>& negatives = finite_queries_;
    if (negatives.empty()) {
      for (const int64_t p : finite_keys_) key_[p] = 0.0;
      return;
    }
    gather_boxes(negatives);
    sweep_.reset(key_boxes_.data(), negatives.data(), static_cast<int64_t>(negatives.size()));
    best_.assign(negatives.size(), T(0));
    for (const int64_t p : finite_keys_) {
      key_[p] = static_cast<double>(sweep_.max_into_and_max(boxes_.data() + 4 * p, best_.data()));
    }
    for (size_t r = 0; r < negatives.size(); ++r) {
      key_[sweep_.id(static_cast<int64_t>(r))] = static_cast<double>(best_[r]);
    }
  }

  // finite_queries_ = the queries without a NaN coordinate. A query with one
  // (only with validate=false) can still meet boxes anywhere: box_iou_pair's
  // min/max then pick the other box's coordinate. Such queries get their key
  // here, compared with every key, as on CUDA; the sweeps take the others.
  void keep_nan_free(const std::vector<int64_t>& all_queries, const std::vector<int64_t>& keys,
                     bool exclude_self) {
    finite_queries_.clear();
    for (const int64_t e : all_queries) {
      const T* q = boxes_.data() + 4 * e;
      if (q[0] == q[0] && q[1] == q[1] && q[2] == q[2] && q[3] == q[3]) {
        finite_queries_.push_back(e);
        continue;
      }
      T best = T(0);
      for (const int64_t k : keys) {
        if (exclude_self && k == e) continue;
        const T iou = box_iou_pair(q, boxes_.data() + 4 * k);
        best = iou > best ? iou : best;
      }
      key_[e] = static_cast<double>(best);
    }
  }

  void overlaps_with(const std::vector<int64_t>& all_queries, const std::vector<int64_t>& keys,
                     bool exclude_self) {
    if (keys.empty()) {
      for (const int64_t e : all_queries) key_[e] = 0.0;
      return;
    }
    keep_nan_free(all_queries, keys, exclude_self);
    const std::vector<int64_t>& queries = finite_queries_;
    if (queries.empty()) return;
    if (!exclude_self && queries.size() >= keys.size()) {
      // Values only, and more queries than keys (negatives against positives):
      // sweep the queries and make one long vectorised pass per key.
      gather_boxes(queries);
      sweep_.reset(key_boxes_.data(), queries.data(), static_cast<int64_t>(queries.size()));
      best_.assign(queries.size(), T(0));
      for (const int64_t k : keys) sweep_.max_into(boxes_.data() + 4 * k, best_.data());
      for (size_t r = 0; r < queries.size(); ++r) {
        key_[sweep_.id(static_cast<int64_t>(r))] = static_cast<double>(best_[r]);
      }
      return;
    }
    gather_boxes(keys);
    sweep_.reset(key_boxes_.data(), keys.data(), static_cast<int64_t>(keys.size()));
    for (const int64_t e : queries) {
      T best;
      if (exclude_self) {
        int64_t unused;
        sweep_.query(boxes_.data() + 4 * e, e, best, unused);
      } else {
        best = sweep_.max_value(boxes_.data() + 4 * e);
      }
      key_[e] = static_cast<double>(best);
    }
  }

  // key_boxes_ = the boxes of `members`, in order.
  void gather_boxes(const std::vector<int64_t>& members) {
    key_boxes_.resize(4 * members.size());
    for (size_t i = 0; i < members.size(); ++i) {
      std::copy_n(boxes_.data() + 4 * members[i], 4, key_boxes_.data() + 4 * i);
    }
  }

  double uniform(int64_t e) const { return uniforms_[example_id_[e]]; }

  // Marks `quota` members of one class as selected, by `strategy`.
  void select(const std::vector<int64_t>& members, int strategy, int64_t quota) {
    const int K = o_.num_bins;
    if (uses_bin_quotas(strategy)) {
      double upper = 0.0;
      if (o_.fixed_upper) {
        upper = o_.bin_upper;
      } else if (strategy == kIouBalanced) {
        upper = o_.bg_iou_thresh;
      } else {
        for (const int64_t e : members) upper = std::max(upper, key_[e]);
      }
      int64_t counts[kMaxBins] = {0};
      int64_t take[kMaxBins];
      bins_.resize(K);
      for (auto& bin : bins_) bin.clear();
      for (const int64_t e : members) {
        const int k = bin_index(key_[e], 0.0, upper, K);
        bins_[k].push_back({sampling_key(uniform(e), 1.0), e});
        counts[k] += 1;
      }
      water_fill(counts, K, quota, take);
      for (int k = 0; k < K; ++k) mark_top(bins_[k], take[k]);
      return;
    }
    candidates_.clear();
    if (strategy == kSoftReference) {
      double lower = 0.0, upper = 0.0;
      if (!members.empty()) lower = upper = key_[members[0]];
      for (const int64_t e : members) {
        lower = std::min(lower, key_[e]);
        upper = std::max(upper, key_[e]);
      }
      int64_t counts[kMaxBins] = {0};
      for (const int64_t e : members) counts[bin_index(key_[e], lower, upper, K)] += 1;
      int64_t nonempty = 0;
      for (int k = 0; k < K; ++k) nonempty += counts[k] > 0;
      for (const int64_t e : members) {
        const double share =
            1.0 / (static_cast<double>(counts[bin_index(key_[e], lower, upper, K)]) * nonempty);
        candidates_.push_back({sampling_key(uniform(e), share), e});
      }
    } else {
      for (const int64_t e : members) {
        const double w = strategy_weight(strategy, key_[e], o_.hard_thresh, 0.0);
        candidates_.push_back({sampling_key(uniform(e), w), e});
      }
    }
    mark_top(candidates_, quota);
  }

  // Top-k by key; ties to the lower *global* example id (ids here are local,
  // and local order is global order within an image).
  void mark_top(std::vector<KeyedCandidate>& candidates, int64_t count) {
    const int64_t take = select_top(candidates, count, /*ordered=*/false);
    for (int64_t i = 0; i < take; ++i) selected_[candidates[i].id] = 1;
  }

  void write(OutputRow out, int64_t g_begin, int64_t g_end, int64_t qp, int64_t qn) {
    int64_t col = 0;
    for (const int64_t e : pos_) {  // pos_ and neg_ are in ascending example id
      if (!selected_[e]) continue;
      out.indices[col] = example_id_[e];
      out.matched_gt[col] = matched_[e];
      out.weights[col] = 1.0f;
      column_[e] = col++;
    }
    for (const int64_t e : neg_) {
      if (!selected_[e]) continue;
      out.indices[col] = example_id_[e];
      out.weights[col] = 1.0f;
      col++;
    }
    *out.num_pos = qp;
    *out.num_neg = qn;
    if (o_.pos_weight == 1.0 || g_end == g_begin) return;
    // epsilon: the best sampled proposal of each GT (its own copy excluded).
    best_iou_.assign(g_end - g_begin, T(0));
    best_example_.assign(g_end - g_begin, -1);
    for (const int64_t e : pos_) {
      if (!selected_[e] || e >= num_local_proposals_) continue;
      const int64_t g = matched_[e] - g_begin;
      update_max(iou_gt_[e], e, best_iou_[g], best_example_[g]);
    }
    for (const int64_t e : best_example_) {
      if (e >= 0) out.weights[column_[e]] = static_cast<float>(o_.pos_weight);
    }
  }

  const SampleOptions& o_;
  const T* proposals_;
  const T* gt_boxes_;
  const double* uniforms_;
  const int64_t num_proposals_;

  int64_t num_local_proposals_ = 0;
  std::vector<T> boxes_;
  std::vector<int64_t> example_id_;
  std::vector<T> iou_gt_;
  std::vector<int64_t> matched_;
  std::vector<double> key_;
  std::vector<int64_t> pos_, neg_, all_;
  std::vector<char> selected_;
  std::vector<int64_t> column_;
  std::vector<T> x1_, y1_, x2_, y2_, area_;  // the proposals, one array per coordinate
  std::vector<int32_t> best_gt_offset_;
  std::vector<T> key_boxes_;
  std::vector<T> best_;  // key-major overlaps, in the sweep's order
  std::vector<int64_t> finite_queries_;
  std::vector<int64_t> finite_keys_;
  OverlapSweep<T> sweep_;
  std::vector<KeyedCandidate> candidates_;
  std::vector<std::vector<KeyedCandidate>> bins_;
  std::vector<T> best_iou_;
  std::vector<int64_t> best_example_;
};

SampleResult sample_from_uniforms_cpu(
    const at::Tensor& proposals, const at::Tensor& proposal_splits, const at::Tensor& gt_boxes,
    const at::Tensor& gt_splits, const at::Tensor& uniforms, int64_t batch_size_per_image,
    double positive_fraction, double fg_iou_thresh, double bg_iou_thresh, bool append_gt,
    c10::string_view neg_strategy, c10::string_view pos_strategy, int64_t num_bins,
    double hard_thresh, std::optional<double> bin_upper, double pos_weight,
    c10::string_view pos_key, bool validate) {
  const SampleOptions o = parse_sample_options(
      batch_size_per_image, positive_fraction, fg_iou_thresh, bg_iou_thresh, append_gt,
      std::string(neg_strategy), std::string(pos_strategy), num_bins, hard_thresh, bin_upper,
      pos_weight, std::string(pos_key));
  check_sample_inputs(proposals, proposal_splits, gt_boxes, gt_splits, uniforms,
                      batch_size_per_image, append_gt, validate);
  const int64_t images = proposal_splits.size(0) - 1;
  const auto long_options = proposals.options().dtype(at::kLong);
  at::Tensor indices = at::full({images, o.batch_size_per_image}, -1, long_options);
  at::Tensor matched = at::full({images, o.batch_size_per_image}, -1, long_options);
  at::Tensor weights =
      at::zeros({images, o.batch_size_per_image}, proposals.options().dtype(at::kFloat));
  at::Tensor num_pos = at::zeros({images}, long_options);
  at::Tensor num_neg = at::zeros({images}, long_options);
  if (images == 0) return {indices, matched, weights, num_pos, num_neg};

  const at::Tensor ps = proposal_splits.contiguous();
  const at::Tensor gs = gt_splits.contiguous();
  const at::Tensor u = uniforms.contiguous();
  const int64_t* psp = ps.const_data_ptr<int64_t>();
  const int64_t* gsp = gs.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(proposals.scalar_type(), "sample_from_uniforms_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor p_acc = proposals.to(acc_type).contiguous();
    const at::Tensor g_acc = gt_boxes.to(acc_type).contiguous();
    const int64_t width = o.batch_size_per_image;
    at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
      ImageSampler<acc_t> sampler(o, p_acc.const_data_ptr<acc_t>(), g_acc.const_data_ptr<acc_t>(),
                                  u.const_data_ptr<double>(), proposals.size(0));
      for (int64_t b = begin; b < end; ++b) {
        OutputRow row{indices.data_ptr<int64_t>() + b * width,
                      matched.data_ptr<int64_t>() + b * width,
                      weights.data_ptr<float>() + b * width, num_pos.data_ptr<int64_t>() + b,
                      num_neg.data_ptr<int64_t>() + b};
        sampler.run(psp[b], psp[b + 1], gsp[b], gsp[b + 1], row);
      }
    });
  });
  return {indices, matched, weights, num_pos, num_neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(overlap_sampler, CPU, m) {
  m.impl("sample_from_uniforms", &sample_from_uniforms_cpu);
}

}  // namespace overlap_sampler
