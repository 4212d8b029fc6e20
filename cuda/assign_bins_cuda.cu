// assign_bins on CUDA: one block per image (looped), a block max over the
// masked values, then bin_index per row. Max is exact, so the upper bound is
// the CPU's whatever the reduction order.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_utils.cuh"
#include "sampling_math.h"

namespace overlap_sampler {
namespace {

using gpu::kThreads;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    assign_bins_kernel(const scalar_t* __restrict__ values, const int64_t* __restrict__ splits,
                       int64_t num_images, const bool* __restrict__ mask, int num_bins,
                       bool fixed_upper, double upper, int64_t* __restrict__ bins) {
  __shared__ double scratch[gpu::kWarps];
  for (int64_t b = blockIdx.x; b < num_images; b += gridDim.x) {
    const int64_t r0 = splits[b];
    const int64_t r1 = splits[b + 1];
    double image_upper = upper;
    if (!fixed_upper) {
      // As the CPU: the max starts at 0 (0 when no row is masked in).
      double m = 0.0;
      for (int64_t r = r0 + threadIdx.x; r < r1; r += kThreads) {
        if (mask == nullptr || mask[r]) m = gpu::MaxOp()(m, static_cast<double>(values[r]));
      }
      image_upper = gpu::block_all_reduce(m, gpu::MaxOp(), scratch);
    }
    for (int64_t r = r0 + threadIdx.x; r < r1; r += kThreads) {
      bins[r] = (mask == nullptr || mask[r])
                    ? bin_index(static_cast<double>(values[r]), 0.0, image_upper, num_bins)
                    : int64_t{-1};
    }
  }
}

}  // namespace

at::Tensor assign_bins_cuda(const at::Tensor& values, const at::Tensor& splits,
                            const std::optional<at::Tensor>& mask, int64_t num_bins,
                            std::optional<double> upper) {
  check_assign_bins_args(values, splits, mask, num_bins, upper);
  const c10::cuda::CUDAGuard guard(values.device());
  at::Tensor bins = at::empty({values.size(0)}, values.options().dtype(at::kLong));
  if (values.numel() == 0) return bins;
  const at::Tensor v = values.contiguous();
  const at::Tensor s = splits.contiguous();
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const int64_t num_images = s.size(0) - 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "assign_bins_cuda", [&] {
    assign_bins_kernel<scalar_t><<<gpu::item_blocks(num_images), kThreads, 0, stream>>>(
        v.const_data_ptr<scalar_t>(), s.const_data_ptr<int64_t>(), num_images,
        m.defined() ? m.const_data_ptr<bool>() : nullptr, static_cast<int>(num_bins),
        upper.has_value(), upper.value_or(0.0), bins.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return bins;
}

TORCH_LIBRARY_IMPL(overlap_sampler, CUDA, m) { m.impl("assign_bins", &assign_bins_cuda); }

}  // namespace overlap_sampler
