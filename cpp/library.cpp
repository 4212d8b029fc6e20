// Every schema of the library, in one place: this is the API contract.
// Backends register their kernels in cpp/*_cpu.cpp and cuda/*_cuda.cu; the
// fake (meta) kernels live in python/overlap_sampler/ops/_fake.py.
//
// Conventions shared by all ops:
//  * boxes are (x1, y1, x2, y2) rows of float16/float32/float64;
//  * a ragged batch concatenates the rows of all images and is delimited by
//    `splits`, int64 [B+1] offsets (first 0, last = row count, non-decreasing);
//  * fixed-shape outputs are padded with -1 (indices) so no op needs to read
//    a tensor's values on the host to size its output.
#include <torch/library.h>

TORCH_LIBRARY(overlap_sampler, m) {
  // N x M IoU matrix, equal to torchvision.ops.box_iou; zero union gives 0.
  m.def("box_iou(Tensor boxes1, Tensor boxes2) -> Tensor");

  // For each query row, the max IoU with any key row of the same image and
  // the global index of that key (lowest index on ties; -1 when the image has
  // no eligible key). Masks restrict queries / keys; `exclude_self` skips the
  // key with the same local index (queries and keys then share their splits).
  // Tiled: never materialises the query x key matrix.
  m.def(
      "max_iou(Tensor queries, Tensor query_splits, Tensor keys, Tensor key_splits, *, "
      "Tensor? query_mask=None, Tensor? key_mask=None, bool exclude_self=False) "
      "-> (Tensor values, Tensor indices)");

  // Bin index in [0, num_bins) of each value: K equal bins over [0, upper],
  // upper = the image's max (masked) value, or the fixed `upper`. -1 where
  // the mask is false.
  m.def(
      "assign_bins(Tensor values, Tensor splits, *, Tensor? mask=None, int num_bins=2, "
      "float? upper=None) -> Tensor");

  // Successive weighted sampling without replacement inside each segment
  // [splits[s], splits[s+1]): Efraimidis-Spirakis keys from `uniforms`, the
  // top counts[s] per segment. weight +inf = always first, 0 = only after
  // every positive weight. Output [S, max_count] global indices in draw order,
  // -1 padded.
  m.def(
      "weighted_sample(Tensor weights, Tensor uniforms, Tensor splits, Tensor counts, "
      "int max_count) -> Tensor");

  // The Overlap Sampler for a whole batch (docs/ops.md). Draws one uniform
  // per example from `generator` and calls sample_from_uniforms.
  m.def(
      "sample(Tensor proposals, Tensor proposal_splits, Tensor gt_boxes, Tensor gt_splits, *, "
      "int batch_size_per_image=512, float positive_fraction=0.25, "
      "float fg_iou_thresh=0.5, float bg_iou_thresh=0.5, bool append_gt=True, "
      "str neg_strategy=\"soft\", str pos_strategy=\"uniform\", int num_bins=2, "
      "float hard_thresh=0.5, float? bin_upper=None, float pos_weight=1.0, "
      "Generator? generator=None, str pos_key=\"negatives\", bool validate=True) "
      "-> (Tensor indices, Tensor matched_gt, Tensor weights, Tensor num_pos, Tensor num_neg)");

  // The deterministic core of `sample`: `uniforms` float64 [E] holds one
  // uniform in [0, 1) per example (E = N, plus G with append_gt).
  m.def(
      "sample_from_uniforms(Tensor proposals, Tensor proposal_splits, Tensor gt_boxes, "
      "Tensor gt_splits, Tensor uniforms, *, int batch_size_per_image=512, "
      "float positive_fraction=0.25, float fg_iou_thresh=0.5, float bg_iou_thresh=0.5, "
      "bool append_gt=True, str neg_strategy=\"soft\", str pos_strategy=\"uniform\", "
      "int num_bins=2, float hard_thresh=0.5, float? bin_upper=None, float pos_weight=1.0, "
      "str pos_key=\"negatives\", bool validate=True) "
      "-> (Tensor indices, Tensor matched_gt, Tensor weights, Tensor num_pos, Tensor num_neg)");
}
