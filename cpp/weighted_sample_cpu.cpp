// weighted_sample on the CPU: Efraimidis-Spirakis keys, top-k per segment.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "sampling_math.h"
#include "select_top.h"

namespace overlap_sampler {

at::Tensor weighted_sample_cpu(const at::Tensor& weights, const at::Tensor& uniforms,
                               const at::Tensor& splits, const at::Tensor& counts,
                               int64_t max_count) {
  check_weighted_sample_args(weights, uniforms, splits, counts, max_count);
  const int64_t segments = splits.size(0) - 1;
  at::Tensor out = at::full({segments, max_count}, -1, weights.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  const at::Tensor u = uniforms.to(at::kDouble).contiguous();
  const at::Tensor s = splits.contiguous();
  const at::Tensor c = counts.contiguous();
  const double* wp = w.const_data_ptr<double>();
  const double* up = u.const_data_ptr<double>();
  const int64_t* sp = s.const_data_ptr<int64_t>();
  const int64_t* cp = c.const_data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<KeyedCandidate> candidates;
    for (int64_t seg = begin; seg < end; ++seg) {
      candidates.clear();
      for (int64_t r = sp[seg]; r < sp[seg + 1]; ++r) {
        candidates.push_back({sampling_key(up[r], wp[r]), r});
      }
      const int64_t take = select_top(candidates, std::min(cp[seg], max_count), /*ordered=*/true);
      for (int64_t i = 0; i < take; ++i) op[seg * max_count + i] = candidates[i].id;
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(overlap_sampler, CPU, m) { m.impl("weighted_sample", &weighted_sample_cpu); }

}  // namespace overlap_sampler
