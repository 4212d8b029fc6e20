// assign_bins on the CPU: per image, the (masked) max, then bin_index.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "sampling_math.h"

namespace overlap_sampler {

at::Tensor assign_bins_cpu(const at::Tensor& values, const at::Tensor& splits,
                           const std::optional<at::Tensor>& mask, int64_t num_bins,
                           std::optional<double> upper) {
  check_assign_bins_args(values, splits, mask, num_bins, upper);
  at::Tensor bins = at::empty({values.size(0)}, values.options().dtype(at::kLong));
  if (values.numel() == 0) return bins;
  const at::Tensor v = values.contiguous();
  const at::Tensor s = splits.contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const int64_t* sp = s.const_data_ptr<int64_t>();
  const bool* mp = m.defined() ? m.const_data_ptr<bool>() : nullptr;
  int64_t* out = bins.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "assign_bins_cpu", [&] {
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    at::parallel_for(0, s.size(0) - 1, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        double image_upper = 0.0;
        if (upper.has_value()) {
          image_upper = *upper;
        } else {
          for (int64_t r = sp[b]; r < sp[b + 1]; ++r) {
            if (mp == nullptr || mp[r]) image_upper = std::max(image_upper, double(vp[r]));
          }
        }
        for (int64_t r = sp[b]; r < sp[b + 1]; ++r) {
          out[r] = (mp == nullptr || mp[r])
                       ? bin_index(double(vp[r]), 0.0, image_upper, static_cast<int>(num_bins))
                       : -1;
        }
      }
    });
  });
  return bins;
}

TORCH_LIBRARY_IMPL(overlap_sampler, CPU, m) { m.impl("assign_bins", &assign_bins_cpu); }

}  // namespace overlap_sampler
