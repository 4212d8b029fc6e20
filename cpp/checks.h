// Input checks shared by every op and backend. Shape/dtype/device checks read
// no values; the value checks (finite coordinates, consistent splits) read
// tensors and so synchronise with a GPU: ops run them always, except `sample`
// where they sit behind its `validate` switch.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace overlap_sampler {

// A tensor's dtype for error messages, "None" for an undefined tensor (what
// Python's None becomes when passed for a Tensor argument).
std::string dtype_of(const at::Tensor& t);

// Largest row width of an op's padded output (batch_size_per_image of
// `sample`, max_count of `weighted_sample`), and most entries of such an
// output: limits far above any detector's (512 RoIs per image), checked before
// anything is allocated, so a typo gives a ValueError rather than an attempt
// to allocate terabytes or an overflowing size computation.
constexpr int64_t kMaxOutputWidth = int64_t{1} << 24;
constexpr int64_t kMaxOutputEntries = (int64_t{1} << 31) - 1;

// A strided (dense) tensor: sparse and other layouts are refused by name.
void check_dense(const at::Tensor& t, const char* name);

// width <= kMaxOutputWidth and rows * width <= kMaxOutputEntries.
void check_output_size(int64_t rows, int64_t width, const char* name);

// boxes: [R, 4] float16/32/64. Raises TypeError/ValueError naming `name`.
void check_boxes(const at::Tensor& boxes, const char* name);

// splits: int64 [B+1] on the same device as `like`.
void check_splits(const at::Tensor& splits, const at::Tensor& like, const char* name);

// Both tensors on one device (named in the message).
void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b,
                       const char* b_name);

// Optional per-row bool mask with `rows` entries on `like`'s device.
void check_mask(const std::optional<at::Tensor>& mask, int64_t rows, const at::Tensor& like,
                const char* name);

// Value checks (synchronise on CUDA).
void validate_finite(const at::Tensor& values, const char* name);
void validate_splits(const at::Tensor& splits, int64_t rows, const char* name);
void validate_uniforms(const at::Tensor& uniforms, const char* name);  // in [0, 1), not NaN
// sample_from_uniforms' value checks in one read of the device: finite proposals and GT boxes,
// ordered GT boxes, uniforms in [0, 1). The same messages as the checks above.
void validate_sample_values(const at::Tensor& proposals, const at::Tensor& gt_boxes,
                            const at::Tensor& uniforms);

// Every check of one op's arguments, shared by its CPU and CUDA kernels so the
// two backends reject exactly the same inputs with the same messages.
void check_box_iou_args(const at::Tensor& boxes1, const at::Tensor& boxes2);
void check_max_iou_args(const at::Tensor& queries, const at::Tensor& query_splits,
                        const at::Tensor& keys, const at::Tensor& key_splits,
                        const std::optional<at::Tensor>& query_mask,
                        const std::optional<at::Tensor>& key_mask, bool exclude_self);
void check_assign_bins_args(const at::Tensor& values, const at::Tensor& splits,
                            const std::optional<at::Tensor>& mask, int64_t num_bins,
                            std::optional<double> upper);
void check_weighted_sample_args(const at::Tensor& weights, const at::Tensor& uniforms,
                                const at::Tensor& splits, const at::Tensor& counts,
                                int64_t max_count);

}  // namespace overlap_sampler
