// The scalar settings of `sample`, parsed and checked once on the host and
// passed by value to the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

#include "sampling_math.h"

namespace overlap_sampler {

struct SampleOptions {
  int64_t batch_size_per_image;
  int64_t positive_quota;  // round(batch_size_per_image * positive_fraction)
  double fg_iou_thresh;
  double bg_iou_thresh;
  bool append_gt;
  int32_t neg_strategy;
  int32_t pos_strategy;
  int32_t num_bins;
  double hard_thresh;
  bool fixed_upper;  // bin_upper given
  double bin_upper;
  double pos_weight;
  bool pos_key_all;  // positive key over all other examples, not only negatives
};

SampleOptions parse_sample_options(int64_t batch_size_per_image, double positive_fraction,
                                   double fg_iou_thresh, double bg_iou_thresh, bool append_gt,
                                   const std::string& neg_strategy,
                                   const std::string& pos_strategy, int64_t num_bins,
                                   double hard_thresh, std::optional<double> bin_upper,
                                   double pos_weight, const std::string& pos_key);

// (indices, matched_gt, weights, num_pos, num_neg) and the C++ signature of
// sample_from_uniforms, as kernels implement it and the dispatcher calls it.
using SampleResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using SampleFromUniformsFn = SampleResult(
    const at::Tensor& proposals, const at::Tensor& proposal_splits, const at::Tensor& gt_boxes,
    const at::Tensor& gt_splits, const at::Tensor& uniforms, int64_t batch_size_per_image,
    double positive_fraction, double fg_iou_thresh, double bg_iou_thresh, bool append_gt,
    c10::string_view neg_strategy, c10::string_view pos_strategy, int64_t num_bins,
    double hard_thresh, std::optional<double> bin_upper, double pos_weight,
    c10::string_view pos_key, bool validate);

// Shape/dtype/device/layout checks of the tensor arguments of
// sample_from_uniforms and the size of its outputs, plus the value checks
// when `validate` is set. Returns the example count E.
int64_t check_sample_inputs(const at::Tensor& proposals, const at::Tensor& proposal_splits,
                            const at::Tensor& gt_boxes, const at::Tensor& gt_splits,
                            const at::Tensor& uniforms, int64_t batch_size_per_image,
                            bool append_gt, bool validate);

}  // namespace overlap_sampler
