// weighted_sample on CUDA: one block per segment (looped). The block writes
// the segment's Efraimidis-Spirakis keys to a workspace, resolves the top
// t = min(count, size, max_count) by the block radix select (ties to the lower
// row), compacts the selected rows in row order, sorts them into draw order
// (key descending, then row ascending) by a merge sort in global memory, and
// writes the output row, -1 padded. One launch, no host synchronisation.
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

// A selected element: its key and its index inside the segment.
struct Drawn {
  unsigned long long key;
  long long index;
};

// Draw order: larger key first, then lower index (select_top.h's drawn_before).
__device__ __forceinline__ bool drawn_before(const Drawn& a, const Drawn& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

// keys: [R] workspace; buffers: two [R] workspaces; a segment uses the rows
// [splits[s], splits[s+1]) of each, so segments never share workspace.
template <typename weight_t, typename uniform_t>
__global__ void __launch_bounds__(kThreads)
    weighted_sample_kernel(const weight_t* __restrict__ weights,
                           const uniform_t* __restrict__ uniforms,
                           const int64_t* __restrict__ splits, const int64_t* __restrict__ counts,
                           int64_t num_segments, int64_t max_count, unsigned long long* keys,
                           Drawn* buffer_a, Drawn* buffer_b, int64_t* __restrict__ out) {
  __shared__ gpu::TopKState<1> state;
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long scan_scratch[gpu::kWarps];

  for (int64_t seg = blockIdx.x; seg < num_segments; seg += gridDim.x) {
    const int64_t start = splits[seg];
    const int64_t n = splits[seg + 1] - start;
    const int64_t limit = counts[seg] < max_count ? counts[seg] : max_count;
    const int64_t take = limit < 0 ? 0 : (limit < n ? limit : n);
    unsigned long long* seg_keys = keys + start;

    if (take > 0) {  // block-uniform
      for (int64_t i = threadIdx.x; i < n; i += kThreads) {
        seg_keys[i] = sampling_key(static_cast<double>(uniforms[start + i]),
                                   static_cast<double>(weights[start + i]));
      }
    }
    __syncthreads();  // keys written; the last segment's readers of `state` are done
    if (threadIdx.x == 0) gpu::topk_init(state, 0, take, n);
    const auto seg_of = [](int64_t) { return 0; };
    const auto key_of = [&](int64_t i) { return seg_keys[i]; };
    gpu::block_topk_resolve<1>(n, 1, state, hist, seg_of, key_of);

    // Selected elements, compacted in index order (n == take for kTopKAll).
    Drawn* src = buffer_a + start;
    Drawn* dst = buffer_b + start;
    unsigned long long written = 0;
    if (take > 0) {
      for (int64_t base = 0; base < n; base += kThreads) {
        const int64_t i = base + threadIdx.x;
        const bool selected = i < n && gpu::topk_selected(state, 0, i, n, key_of);
        unsigned long long total;
        const unsigned long long rank =
            gpu::block_exclusive_sum(selected ? 1ull : 0ull, scan_scratch, &total);
        if (selected) src[written + rank] = Drawn{seg_keys[i], i};
        written += total;
      }
    }
    __syncthreads();
    // Merge sort by ranking: element j of a sorted run lands at its position in
    // the run plus the number of partner-run elements drawn before it (binary
    // search; (key, index) pairs are unique, so no two land on one slot).
    for (int64_t width = 1; width < take; width *= 2) {
      for (int64_t j = threadIdx.x; j < take; j += kThreads) {
        const Drawn x = src[j];
        const int64_t run = j / width;
        const int64_t run_start = run * width;
        const int64_t partner_start = (run ^ 1) * width;
        const int64_t partner_end = min(partner_start + width, take);
        int64_t lo = partner_start, hi = max(partner_start, partner_end);
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo) / 2;
          if (drawn_before(src[mid], x)) {
            lo = mid + 1;
          } else {
            hi = mid;
          }
        }
        const int64_t merged_start = min(run_start, partner_start);
        dst[merged_start + (j - run_start) + (lo - partner_start)] = x;
      }
      __syncthreads();
      Drawn* t = src;
      src = dst;
      dst = t;
    }
    int64_t* row = out + seg * max_count;
    for (int64_t j = threadIdx.x; j < max_count; j += kThreads) {
      row[j] = j < take ? start + src[j].index : int64_t{-1};
    }
  }
}

}  // namespace

at::Tensor weighted_sample_cuda(const at::Tensor& weights, const at::Tensor& uniforms,
                                const at::Tensor& splits, const at::Tensor& counts,
                                int64_t max_count) {
  check_weighted_sample_args(weights, uniforms, splits, counts, max_count);
  const c10::cuda::CUDAGuard guard(weights.device());
  const int64_t num_segments = splits.size(0) - 1;
  at::Tensor out = at::empty({num_segments, max_count}, weights.options().dtype(at::kLong));
  if (out.numel() == 0) return out;
  const at::Tensor w = weights.contiguous();
  const at::Tensor u = uniforms.contiguous();
  const at::Tensor s = splits.contiguous();
  const at::Tensor c = counts.contiguous();
  const int64_t rows = w.size(0);
  // keys, then the two sort buffers (16 bytes per row each).
  static_assert(sizeof(Drawn) == 2 * sizeof(int64_t), "Drawn is two 64-bit words");
  at::Tensor workspace = at::empty({5 * rows}, w.options().dtype(at::kLong));
  auto* keys = reinterpret_cast<unsigned long long*>(workspace.mutable_data_ptr<int64_t>());
  auto* buffer_a = reinterpret_cast<Drawn*>(keys + rows);
  auto* buffer_b = reinterpret_cast<Drawn*>(keys + 3 * rows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "weighted_sample_cuda", [&] {
    using weight_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "weighted_sample_cuda", [&] {
      weighted_sample_kernel<weight_t, scalar_t>
          <<<gpu::item_blocks(num_segments), kThreads, 0, stream>>>(
              w.const_data_ptr<weight_t>(), u.const_data_ptr<scalar_t>(),
              s.const_data_ptr<int64_t>(), c.const_data_ptr<int64_t>(), num_segments, max_count,
              keys, buffer_a, buffer_b, out.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(overlap_sampler, CUDA, m) { m.impl("weighted_sample", &weighted_sample_cuda); }

}  // namespace overlap_sampler
