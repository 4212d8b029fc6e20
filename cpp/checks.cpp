#include "checks.h"
#include "sampling_math.h"

#include <ATen/ATen.h>

#include <cmath>
#include <string>

namespace overlap_sampler {

std::string dtype_of(const at::Tensor& t) {
  return t.defined() ? std::string(c10::toString(t.scalar_type())) : std::string("None");
}

void check_dense(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(!t.defined() || t.layout() == at::kStrided, name,
                   " must be a dense (strided) tensor, got layout ", t.layout());
}

void check_output_size(int64_t rows, int64_t width, const char* name) {
  TORCH_CHECK_VALUE(width <= kMaxOutputWidth, name, " must be at most ", kMaxOutputWidth,
                    " (the width of the padded output), got ", width);
  TORCH_CHECK_VALUE(rows == 0 || width <= kMaxOutputEntries / rows, name, " = ", width, " for ",
                    rows, " rows would make an output of more than ", kMaxOutputEntries,
                    " entries");
}

void check_boxes(const at::Tensor& boxes, const char* name) {
  check_dense(boxes, name);
  TORCH_CHECK_TYPE(at::isFloatingType(boxes.scalar_type()) &&
                       boxes.scalar_type() != at::kBFloat16,
                   name, " must be float16, float32 or float64, got ", dtype_of(boxes));
  TORCH_CHECK_VALUE(boxes.dim() == 2 && boxes.size(1) == 4, name,
                    " must have shape [R, 4] (x1, y1, x2, y2), got ", boxes.sizes());
}

void check_splits(const at::Tensor& splits, const at::Tensor& like, const char* name) {
  check_dense(splits, name);
  TORCH_CHECK_TYPE(splits.scalar_type() == at::kLong, name, " must be int64, got ",
                   dtype_of(splits));
  TORCH_CHECK_VALUE(splits.dim() == 1 && splits.size(0) >= 1, name,
                    " must be a 1-D offsets tensor [B+1], got shape ", splits.sizes());
  check_same_device(splits, name, like, "the boxes");
}

void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "expected ", a_name, " and ", b_name,
                    " on one device, got ", a.device(), " and ", b.device());
}

void check_mask(const std::optional<at::Tensor>& mask, int64_t rows, const at::Tensor& like,
                const char* name) {
  if (!mask.has_value()) return;
  check_dense(*mask, name);
  TORCH_CHECK_TYPE(mask->scalar_type() == at::kBool, name, " must be bool, got ",
                   mask->scalar_type());
  TORCH_CHECK_VALUE(mask->dim() == 1 && mask->size(0) == rows, name, " must have shape [",
                    rows, "], got ", mask->sizes());
  check_same_device(*mask, name, like, "the boxes");
}

void validate_finite(const at::Tensor& values, const char* name) {
  if (values.numel() == 0) return;
  TORCH_CHECK_VALUE(at::isfinite(values).all().item<bool>(), name,
                    " contains NaN or infinite values");
}

void validate_splits(const at::Tensor& splits, int64_t rows, const char* name) {
  // Contiguous: the raw reads below must see the values the kernels see (each
  // kernel reads splits.contiguous()), not the storage of a strided view.
  const at::Tensor host = splits.cpu().contiguous();
  const int64_t* s = host.const_data_ptr<int64_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(s[0] == 0, name, " must start at 0, got ", s[0]);
  TORCH_CHECK_VALUE(s[n - 1] == rows, name, " must end at the row count ", rows, ", got ",
                    s[n - 1]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(s[i] >= s[i - 1], name, " must be non-decreasing, got ", s[i - 1],
                      " then ", s[i], " at position ", i);
  }
}

void validate_uniforms(const at::Tensor& uniforms, const char* name) {
  if (uniforms.numel() == 0) return;
  TORCH_CHECK_VALUE(uniforms.ge(0).logical_and(uniforms.lt(1)).all().item<bool>(), name,
                    " must lie in [0, 1) (no NaN or infinity)");
}

void validate_sample_values(const at::Tensor& proposals, const at::Tensor& gt_boxes,
                            const at::Tensor& uniforms) {
  // Each .item() synchronises a GPU: the four verdicts come back in one copy. (An
  // empty tensor passes each: all() of nothing is true.)
  const at::Tensor gt_ordered = (gt_boxes.select(1, 2) >= gt_boxes.select(1, 0))
                                    .logical_and(gt_boxes.select(1, 3) >= gt_boxes.select(1, 1))
                                    .all();
  const at::Tensor verdicts =
      at::stack({at::isfinite(proposals).all(), at::isfinite(gt_boxes).all(), gt_ordered,
                 uniforms.ge(0).logical_and(uniforms.lt(1)).all()})
          .cpu()
          .contiguous();
  const bool* ok = verdicts.const_data_ptr<bool>();
  TORCH_CHECK_VALUE(ok[0], "proposals contains NaN or infinite values");
  TORCH_CHECK_VALUE(ok[1], "gt_boxes contains NaN or infinite values");
  TORCH_CHECK_VALUE(ok[2], "gt_boxes has a box with x2 < x1 or y2 < y1 (expected x1, y1, x2, y2)");
  TORCH_CHECK_VALUE(ok[3], "uniforms must lie in [0, 1) (no NaN or infinity)");
}

}  // namespace overlap_sampler

namespace overlap_sampler {

void check_box_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_boxes(boxes1, "boxes1");
  check_boxes(boxes2, "boxes2");
  check_same_device(boxes1, "boxes1", boxes2, "boxes2");
  TORCH_CHECK_TYPE(boxes1.scalar_type() == boxes2.scalar_type(),
                   "boxes1 and boxes2 must share a dtype, got ", boxes1.scalar_type(), " and ",
                   boxes2.scalar_type());
  validate_finite(boxes1, "boxes1");
  validate_finite(boxes2, "boxes2");
}

void check_max_iou_args(const at::Tensor& queries, const at::Tensor& query_splits,
                        const at::Tensor& keys, const at::Tensor& key_splits,
                        const std::optional<at::Tensor>& query_mask,
                        const std::optional<at::Tensor>& key_mask, bool exclude_self) {
  check_boxes(queries, "queries");
  check_boxes(keys, "keys");
  TORCH_CHECK_TYPE(queries.scalar_type() == keys.scalar_type(),
                   "queries and keys must share a dtype, got ", queries.scalar_type(), " and ",
                   keys.scalar_type());
  check_same_device(keys, "keys", queries, "queries");
  check_splits(query_splits, queries, "query_splits");
  check_splits(key_splits, queries, "key_splits");
  TORCH_CHECK_VALUE(query_splits.size(0) == key_splits.size(0),
                    "query_splits and key_splits must describe the same number of images, got ",
                    query_splits.size(0) - 1, " and ", key_splits.size(0) - 1);
  check_mask(query_mask, queries.size(0), queries, "query_mask");
  check_mask(key_mask, keys.size(0), queries, "key_mask");
  validate_finite(queries, "queries");
  validate_finite(keys, "keys");
  validate_splits(query_splits, queries.size(0), "query_splits");
  validate_splits(key_splits, keys.size(0), "key_splits");
  if (exclude_self) {
    TORCH_CHECK_VALUE(at::equal(query_splits, key_splits),
                      "exclude_self needs query_splits equal to key_splits (queries and keys are "
                      "the same boxes)");
  }
}

void check_assign_bins_args(const at::Tensor& values, const at::Tensor& splits,
                            const std::optional<at::Tensor>& mask, int64_t num_bins,
                            std::optional<double> upper) {
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
                   "values must be float32 or float64, got ", dtype_of(values));
  check_dense(values, "values");
  TORCH_CHECK_VALUE(values.dim() == 1, "values must be 1-D, got shape ", values.sizes());
  check_splits(splits, values, "splits");
  check_mask(mask, values.size(0), values, "mask");
  TORCH_CHECK_VALUE(num_bins >= 1 && num_bins <= kMaxBins, "num_bins must be in [1, ", kMaxBins,
                    "], got ", num_bins);
  TORCH_CHECK_VALUE(!upper.has_value() || (std::isfinite(*upper) && *upper > 0.0),
                    "upper must be a positive finite number or None, got ", upper.value_or(0.0));
  validate_finite(values, "values");
  validate_splits(splits, values.size(0), "splits");
}

void check_weighted_sample_args(const at::Tensor& weights, const at::Tensor& uniforms,
                                const at::Tensor& splits, const at::Tensor& counts,
                                int64_t max_count) {
  TORCH_CHECK_TYPE(weights.scalar_type() == at::kFloat || weights.scalar_type() == at::kDouble,
                   "weights must be float32 or float64, got ", dtype_of(weights));
  TORCH_CHECK_TYPE(uniforms.scalar_type() == at::kFloat || uniforms.scalar_type() == at::kDouble,
                   "uniforms must be float32 or float64, got ", dtype_of(uniforms));
  check_dense(weights, "weights");
  check_dense(uniforms, "uniforms");
  check_dense(counts, "counts");
  TORCH_CHECK_VALUE(weights.dim() == 1, "weights must be 1-D, got shape ", weights.sizes());
  TORCH_CHECK_VALUE(uniforms.dim() == 1 && uniforms.size(0) == weights.size(0),
                    "uniforms must have shape [", weights.size(0), "] like weights, got ",
                    uniforms.sizes());
  check_same_device(uniforms, "uniforms", weights, "weights");
  check_splits(splits, weights, "splits");
  TORCH_CHECK_TYPE(counts.scalar_type() == at::kLong, "counts must be int64, got ",
                   dtype_of(counts));
  TORCH_CHECK_VALUE(counts.dim() == 1 && counts.size(0) == splits.size(0) - 1,
                    "counts must have shape [", splits.size(0) - 1,
                    "] (one per segment), got ", counts.sizes());
  check_same_device(counts, "counts", weights, "weights");
  TORCH_CHECK_VALUE(max_count >= 0, "max_count must be >= 0, got ", max_count);
  check_output_size(splits.size(0) - 1, max_count, "max_count");
  validate_splits(splits, weights.size(0), "splits");
  if (weights.numel() > 0) {
    TORCH_CHECK_VALUE(weights.ge(0).all().item<bool>(),
                      "weights must be >= 0 (+inf allowed) and not NaN");
    validate_uniforms(uniforms, "uniforms");
  }
  if (counts.numel() > 0) {
    TORCH_CHECK_VALUE(counts.ge(0).all().item<bool>(), "counts must be >= 0");
  }
}

}  // namespace overlap_sampler
