#include "sample_options.h"

#include <ATen/ATen.h>

#include <cmath>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>

#include "checks.h"

namespace overlap_sampler {
namespace {

int32_t parse_strategy(const std::string& name, const char* argument, bool negatives) {
  if (name == "uniform") return kUniform;
  if (name == "hard") return kHard;
  if (name == "soft") return kSoft;
  if (name == "soft_reference") return kSoftReference;
  if (name == "linear") return kLinear;
  if (name == "iou_balanced") {
    TORCH_CHECK_VALUE(negatives, argument,
                      " 'iou_balanced' is defined for negatives only (it bins IoU_g,n over "
                      "[0, bg_iou_thresh))");
    return kIouBalanced;
  }
  TORCH_CHECK_VALUE(false, argument, " must be one of uniform, hard, soft, soft_reference, linear",
                    negatives ? ", iou_balanced" : "", "; got '", name, "'");
}

// All 17 digits, as Python prints a float: the default 6 would show a value
// just above the float32 maximum as the maximum itself.
std::string round_trip(double value) {
  std::ostringstream text;
  text << std::setprecision(17) << value;
  return text.str();
}

void check_unit_interval(double value, const char* name) {
  TORCH_CHECK_VALUE(value >= 0.0 && value <= 1.0, name, " must be in [0, 1], got ", value);
}

}  // namespace

SampleOptions parse_sample_options(int64_t batch_size_per_image, double positive_fraction,
                                   double fg_iou_thresh, double bg_iou_thresh, bool append_gt,
                                   const std::string& neg_strategy,
                                   const std::string& pos_strategy, int64_t num_bins,
                                   double hard_thresh, std::optional<double> bin_upper,
                                   double pos_weight, const std::string& pos_key) {
  TORCH_CHECK_VALUE(batch_size_per_image >= 0, "batch_size_per_image must be >= 0, got ",
                    batch_size_per_image);
  check_output_size(0, batch_size_per_image, "batch_size_per_image");
  check_unit_interval(positive_fraction, "positive_fraction");
  check_unit_interval(fg_iou_thresh, "fg_iou_thresh");
  check_unit_interval(bg_iou_thresh, "bg_iou_thresh");
  TORCH_CHECK_VALUE(bg_iou_thresh <= fg_iou_thresh, "bg_iou_thresh (", bg_iou_thresh,
                    ") must not exceed fg_iou_thresh (", fg_iou_thresh, ")");
  TORCH_CHECK_VALUE(num_bins >= 1 && num_bins <= kMaxBins, "num_bins must be in [1, ", kMaxBins,
                    "], got ", num_bins);
  TORCH_CHECK_VALUE(std::isfinite(hard_thresh), "hard_thresh must be finite, got ", hard_thresh);
  TORCH_CHECK_VALUE(!bin_upper.has_value() || (std::isfinite(*bin_upper) && *bin_upper > 0.0),
                    "bin_upper must be a positive finite number or None, got ",
                    bin_upper.value_or(0.0));
  // The weights output is float32: a larger epsilon would become +inf.
  TORCH_CHECK_VALUE(std::isfinite(pos_weight) && pos_weight >= 0.0 &&
                        pos_weight <= static_cast<double>(std::numeric_limits<float>::max()),
                    "pos_weight must be a finite number in [0, ",
                    round_trip(std::numeric_limits<float>::max()), "] (the float32 maximum), got ",
                    round_trip(pos_weight));
  TORCH_CHECK_VALUE(pos_key == "negatives" || pos_key == "all",
                    "pos_key must be 'negatives' or 'all', got '", pos_key, "'");

  SampleOptions o;
  o.batch_size_per_image = batch_size_per_image;
  o.positive_quota = positive_quota(batch_size_per_image, positive_fraction);
  o.fg_iou_thresh = fg_iou_thresh;
  o.bg_iou_thresh = bg_iou_thresh;
  o.append_gt = append_gt;
  o.neg_strategy = parse_strategy(neg_strategy, "neg_strategy", /*negatives=*/true);
  o.pos_strategy = parse_strategy(pos_strategy, "pos_strategy", /*negatives=*/false);
  o.num_bins = static_cast<int32_t>(num_bins);
  o.hard_thresh = hard_thresh;
  o.fixed_upper = bin_upper.has_value();
  o.bin_upper = bin_upper.value_or(0.0);
  o.pos_weight = pos_weight;
  o.pos_key_all = pos_key == "all";
  return o;
}

int64_t check_sample_inputs(const at::Tensor& proposals, const at::Tensor& proposal_splits,
                            const at::Tensor& gt_boxes, const at::Tensor& gt_splits,
                            const at::Tensor& uniforms, int64_t batch_size_per_image,
                            bool append_gt, bool validate) {
  check_boxes(proposals, "proposals");
  check_boxes(gt_boxes, "gt_boxes");
  TORCH_CHECK_TYPE(proposals.scalar_type() == gt_boxes.scalar_type(),
                   "proposals and gt_boxes must share a dtype, got ", proposals.scalar_type(),
                   " and ", gt_boxes.scalar_type());
  check_same_device(gt_boxes, "gt_boxes", proposals, "proposals");
  check_splits(proposal_splits, proposals, "proposal_splits");
  check_splits(gt_splits, proposals, "gt_splits");
  TORCH_CHECK_VALUE(proposal_splits.size(0) == gt_splits.size(0),
                    "proposal_splits and gt_splits must describe the same number of images, got ",
                    proposal_splits.size(0) - 1, " and ", gt_splits.size(0) - 1);
  check_output_size(proposal_splits.size(0) - 1, batch_size_per_image, "batch_size_per_image");
  check_dense(uniforms, "uniforms");
  const int64_t examples = proposals.size(0) + (append_gt ? gt_boxes.size(0) : 0);
  TORCH_CHECK_TYPE(uniforms.scalar_type() == at::kDouble, "uniforms must be float64, got ",
                   dtype_of(uniforms));
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == examples,
                    "uniforms must have shape [", examples,
                    "] (one per proposal, plus one per GT box with append_gt), got ",
                    uniforms.sizes());
  check_same_device(uniforms, "uniforms", proposals, "proposals");
  // Splits index memory, so the CPU checks them always (it costs no sync);
  // the CUDA kernel clamps them when validate=false instead.
  if (validate || proposals.is_cpu()) {
    validate_splits(proposal_splits, proposals.size(0), "proposal_splits");
    validate_splits(gt_splits, gt_boxes.size(0), "gt_splits");
  }
  if (validate) {
    validate_sample_values(proposals, gt_boxes, uniforms);
  }
  return examples;
}

}  // namespace overlap_sampler
