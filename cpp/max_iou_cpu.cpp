// max_iou on the CPU: per image, an x-sweep over the image's eligible keys.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "overlap_sweep.h"

namespace overlap_sampler {

std::tuple<at::Tensor, at::Tensor> max_iou_cpu(const at::Tensor& queries,
                                                const at::Tensor& query_splits,
                                                const at::Tensor& keys,
                                                const at::Tensor& key_splits,
                                                const std::optional<at::Tensor>& query_mask,
                                                const std::optional<at::Tensor>& key_mask,
                                                bool exclude_self) {
  check_max_iou_args(queries, query_splits, keys, key_splits, query_mask, key_mask, exclude_self);
  at::Tensor values = at::zeros({queries.size(0)}, queries.options());
  at::Tensor indices = at::full({queries.size(0)}, -1, queries.options().dtype(at::kLong));
  if (queries.size(0) == 0 || keys.size(0) == 0) return {values, indices};

  const at::Tensor qs = query_splits.contiguous();
  const at::Tensor ks = key_splits.contiguous();
  const int64_t* qsp = qs.const_data_ptr<int64_t>();
  const int64_t* ksp = ks.const_data_ptr<int64_t>();
  const at::Tensor qmask = query_mask.has_value() ? query_mask->contiguous() : at::Tensor();
  const at::Tensor kmask = key_mask.has_value() ? key_mask->contiguous() : at::Tensor();
  const bool* qm = qmask.defined() ? qmask.const_data_ptr<bool>() : nullptr;
  const bool* km = kmask.defined() ? kmask.const_data_ptr<bool>() : nullptr;
  const int64_t images = qs.size(0) - 1;

  AT_DISPATCH_FLOATING_TYPES_AND_HALF(queries.scalar_type(), "max_iou_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const at::Tensor q_acc = queries.to(acc_type).contiguous();
    const at::Tensor k_acc = keys.to(acc_type).contiguous();
    const acc_t* qp = q_acc.const_data_ptr<acc_t>();
    const acc_t* kp = k_acc.const_data_ptr<acc_t>();
    scalar_t* out_v = values.data_ptr<scalar_t>();
    int64_t* out_i = indices.data_ptr<int64_t>();
    at::parallel_for(0, images, 1, [&](int64_t begin, int64_t end) {
      OverlapSweep<acc_t> sweep;
      std::vector<acc_t> boxes;
      std::vector<int64_t> ids;
      for (int64_t b = begin; b < end; ++b) {
        boxes.clear();
        ids.clear();
        for (int64_t k = ksp[b]; k < ksp[b + 1]; ++k) {
          if (km != nullptr && !km[k]) continue;
          boxes.insert(boxes.end(), kp + 4 * k, kp + 4 * k + 4);
          ids.push_back(k);
        }
        if (ids.empty()) continue;
        sweep.reset(boxes.data(), ids.data(), static_cast<int64_t>(ids.size()));
        for (int64_t q = qsp[b]; q < qsp[b + 1]; ++q) {
          if (qm != nullptr && !qm[q]) continue;
          // With exclude_self, query q and key q (same local index) are one box.
          const int64_t self = exclude_self ? ksp[b] + (q - qsp[b]) : -1;
          acc_t best;
          int64_t best_id;
          sweep.query(qp + 4 * q, self, best, best_id);
          out_v[q] = static_cast<scalar_t>(best);
          out_i[q] = best_id;
        }
      }
    });
  });
  return {values, indices};
}

TORCH_LIBRARY_IMPL(overlap_sampler, CPU, m) { m.impl("max_iou", &max_iou_cpu); }

}  // namespace overlap_sampler
