// box_iou on CUDA: one thread per output element (grid-stride), IoU in the
// accumulate type by the shared box_iou_pair, unfused (gpu::box_iou).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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

template <typename scalar_t>
__global__ void __launch_bounds__(gpu::kThreads)
    box_iou_kernel(const scalar_t* __restrict__ boxes1, const scalar_t* __restrict__ boxes2,
                   int64_t m, int64_t total, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  OS_GRID_STRIDE_LOOP(idx, total) {
    const int64_t i = idx / m;
    const int64_t j = idx - i * m;
    acc_t a[4], b[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      a[k] = static_cast<acc_t>(boxes1[4 * i + k]);
      b[k] = static_cast<acc_t>(boxes2[4 * j + k]);
    }
    out[idx] = static_cast<scalar_t>(gpu::box_iou(a, b));
  }
}

}  // namespace

at::Tensor box_iou_cuda(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou_args(boxes1, boxes2);
  const c10::cuda::CUDAGuard guard(boxes1.device());
  at::Tensor out = at::empty({boxes1.size(0), boxes2.size(0)}, boxes1.options());
  if (out.numel() == 0) return out;
  const at::Tensor a = boxes1.contiguous();
  const at::Tensor b = boxes2.contiguous();
  const int64_t total = out.numel();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(a.scalar_type(), "box_iou_cuda", [&] {
    box_iou_kernel<scalar_t><<<gpu::grid_blocks(total), gpu::kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), b.size(0), total,
        out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

TORCH_LIBRARY_IMPL(overlap_sampler, CUDA, m) { m.impl("box_iou", &box_iou_cuda); }

}  // namespace overlap_sampler
