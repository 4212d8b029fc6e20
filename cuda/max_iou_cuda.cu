// max_iou on CUDA. A block owns kThreads consecutive query rows (one per
// thread); for every image those rows touch, it streams the image's eligible
// keys through shared memory in tiles, so the query x key matrix is never
// materialised and each key is read from global memory once per block.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "checks.h"
#include "cuda_utils.cuh"
#include "sampling_math.h"

namespace overlap_sampler {
namespace {

using gpu::kThreads;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    max_iou_kernel(const scalar_t* __restrict__ queries, const int64_t* __restrict__ query_splits,
                   const scalar_t* __restrict__ keys, const int64_t* __restrict__ key_splits,
                   int64_t num_images, int64_t num_queries, const bool* __restrict__ query_mask,
                   const bool* __restrict__ key_mask, bool exclude_self,
                   scalar_t* __restrict__ out_values, int64_t* __restrict__ out_indices) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t tile_box[kThreads][4];
  __shared__ int64_t tile_row[kThreads];
  __shared__ int tile_count;

  const auto query_start = [&](int64_t b) { return query_splits[b]; };
  // Uniform over the block: the whole loop body is skipped or run by everyone.
  for (int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads; first < num_queries;
       first += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t last = min(first + kThreads, num_queries) - 1;
    const int64_t q = first + threadIdx.x;
    const bool valid = q < num_queries;
    const int64_t b_first = gpu::find_item(query_start, num_images, first);
    const int64_t b_last = gpu::find_item(query_start, num_images, last);
    const int64_t my_image = valid ? gpu::find_item(query_start, num_images, q) : -1;
    const bool active = valid && (query_mask == nullptr || query_mask[q]);
    acc_t box[4];
    if (valid) {
#pragma unroll
      for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(queries[4 * q + k]);
    }
    acc_t best = acc_t(0);
    int64_t best_row = -1;
    for (int64_t b = b_first; b <= b_last; ++b) {
      const bool mine = active && my_image == b;
      // Skip images none of this block's queries need (also syncs the block,
      // so the previous image's tile readers are done).
      if (!__syncthreads_or(mine)) continue;
      const int64_t k0 = key_splits[b];
      const int64_t k1 = key_splits[b + 1];
      const int64_t self_row = exclude_self && mine ? k0 + (q - query_splits[b]) : -1;
      for (int64_t t0 = k0; t0 < k1; t0 += kThreads) {
        if (threadIdx.x == 0) tile_count = 0;
        __syncthreads();
        const int64_t k = t0 + threadIdx.x;
        if (k < k1 && (key_mask == nullptr || key_mask[k])) {
          // Eligible keys only, in any order: update_max ranks (IoU, -row)
          // totally, so the result does not depend on the visiting order.
          const int slot = atomicAdd(&tile_count, 1);
#pragma unroll
          for (int c = 0; c < 4; ++c) tile_box[slot][c] = static_cast<acc_t>(keys[4 * k + c]);
          tile_row[slot] = k;
        }
        __syncthreads();
        if (mine) {
          const int count = tile_count;
          for (int s = 0; s < count; ++s) {
            const int64_t row = tile_row[s];
            if (row == self_row) continue;
            update_max(gpu::box_iou(box, tile_box[s]), row, best, best_row);
          }
        }
        __syncthreads();
      }
    }
    if (valid) {
      // Masked-out queries and images without an eligible key: 0 and -1.
      out_values[q] = static_cast<scalar_t>(best_row >= 0 ? best : acc_t(0));
      out_indices[q] = best_row;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> max_iou_cuda(const at::Tensor& queries,
                                                 const at::Tensor& query_splits,
                                                 const at::Tensor& keys,
                                                 const at::Tensor& key_splits,
                                                 const std::optional<at::Tensor>& query_mask,
                                                 const std::optional<at::Tensor>& key_mask,
                                                 bool exclude_self) {
  check_max_iou_args(queries, query_splits, keys, key_splits, query_mask, key_mask, exclude_self);
  const c10::cuda::CUDAGuard guard(queries.device());
  const int64_t num_queries = queries.size(0);
  at::Tensor values = at::empty({num_queries}, queries.options());
  at::Tensor indices = at::empty({num_queries}, queries.options().dtype(at::kLong));
  if (num_queries == 0) return {values, indices};
  const at::Tensor q = queries.contiguous();
  const at::Tensor k = keys.contiguous();
  const at::Tensor qs = query_splits.contiguous();
  const at::Tensor ks = key_splits.contiguous();
  const at::Tensor qm = query_mask.has_value() ? query_mask->contiguous() : at::Tensor();
  const at::Tensor km = key_mask.has_value() ? key_mask->contiguous() : at::Tensor();
  const int64_t num_images = qs.size(0) - 1;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND_HALF(q.scalar_type(), "max_iou_cuda", [&] {
    max_iou_kernel<scalar_t><<<gpu::grid_blocks(num_queries), kThreads, 0, stream>>>(
        q.const_data_ptr<scalar_t>(), qs.const_data_ptr<int64_t>(), k.const_data_ptr<scalar_t>(),
        ks.const_data_ptr<int64_t>(), num_images, num_queries,
        qm.defined() ? qm.const_data_ptr<bool>() : nullptr,
        km.defined() ? km.const_data_ptr<bool>() : nullptr, exclude_self,
        values.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {values, indices};
}

TORCH_LIBRARY_IMPL(overlap_sampler, CUDA, m) { m.impl("max_iou", &max_iou_cuda); }

}  // namespace overlap_sampler
