// box_iou on the CPU: the N x M IoU matrix, parallel over rows of boxes1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "sampling_math.h"

namespace overlap_sampler {

at::Tensor box_iou_cpu(const at::Tensor& boxes1, const at::Tensor& boxes2) {
  check_box_iou_args(boxes1, boxes2);
  at::Tensor out = at::empty({boxes1.size(0), boxes2.size(0)}, boxes1.options());
  if (out.numel() == 0) return out;
  const at::Tensor a = boxes1.contiguous();
  const at::Tensor b = boxes2.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(a.scalar_type(), "box_iou_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Widen once so the pair loop runs on contiguous acc_t rows.
    const at::Tensor a_acc = a.to(c10::CppTypeToScalarType<acc_t>::value);
    const at::Tensor b_acc = b.to(c10::CppTypeToScalarType<acc_t>::value);
    const acc_t* pa = a_acc.const_data_ptr<acc_t>();
    const acc_t* pb = b_acc.const_data_ptr<acc_t>();
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t m = b.size(0);
    at::parallel_for(0, a.size(0), 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        for (int64_t j = 0; j < m; ++j) {
          po[i * m + j] = static_cast<scalar_t>(box_iou_pair(pa + 4 * i, pb + 4 * j));
        }
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(overlap_sampler, CPU, m) { m.impl("box_iou", &box_iou_cpu); }

}  // namespace overlap_sampler
