// `sample`: one registration for every backend. It checks the options, draws
// one uniform per example from the caller's generator on the boxes' device
// (one launch on CUDA, no sync) and calls sample_from_uniforms, so the random
// draw and the deterministic sampler stay separately testable.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"
#include "sample_options.h"

namespace overlap_sampler {
namespace {

SampleResult sample(const at::Tensor& proposals, const at::Tensor& proposal_splits,
                    const at::Tensor& gt_boxes, const at::Tensor& gt_splits,
                    int64_t batch_size_per_image, double positive_fraction, double fg_iou_thresh,
                    double bg_iou_thresh, bool append_gt, c10::string_view neg_strategy,
                    c10::string_view pos_strategy, int64_t num_bins, double hard_thresh,
                    std::optional<double> bin_upper, double pos_weight,
                    std::optional<at::Generator> generator, c10::string_view pos_key,
                    bool validate) {
  // Options and shapes first, so a bad one is reported before anything is drawn.
  parse_sample_options(batch_size_per_image, positive_fraction, fg_iou_thresh, bg_iou_thresh,
                       append_gt, std::string(neg_strategy), std::string(pos_strategy), num_bins,
                       hard_thresh, bin_upper, pos_weight, std::string(pos_key));
  check_boxes(proposals, "proposals");
  check_boxes(gt_boxes, "gt_boxes");
  check_splits(proposal_splits, proposals, "proposal_splits");
  check_splits(gt_splits, proposals, "gt_splits");
  check_output_size(proposal_splits.size(0) - 1, batch_size_per_image, "batch_size_per_image");
  const int64_t examples = proposals.size(0) + (append_gt ? gt_boxes.size(0) : 0);
  const at::Tensor uniforms =
      at::rand({examples}, generator, proposals.options().dtype(at::kDouble));
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("overlap_sampler::sample_from_uniforms", "")
                             .typed<SampleFromUniformsFn>();
  return op.call(proposals, proposal_splits, gt_boxes, gt_splits, uniforms, batch_size_per_image,
                 positive_fraction, fg_iou_thresh, bg_iou_thresh, append_gt, neg_strategy,
                 pos_strategy, num_bins, hard_thresh, bin_upper, pos_weight, pos_key, validate);
}

}  // namespace

TORCH_LIBRARY_IMPL(overlap_sampler, CompositeExplicitAutograd, m) { m.impl("sample", &sample); }

}  // namespace overlap_sampler
