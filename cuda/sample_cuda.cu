// sample_from_uniforms on CUDA: the whole batch in three launches and a memset
// (two launches when neither strategy reads an overlap key; one more,
// clamp_splits_kernel, with validate=false) and no host synchronisation, so with validate=false it can be
// captured in a CUDA graph.
//
//   1. match_kernel, one thread per example: IoU_g,e, matched GT and label;
//      when keys are needed, also zeroes the overlap keys and lists each
//      image's examples by class (KeyLists: boxes widened to acc_t, areas).
//   2. overlap_key_kernel, one thread per list slot: IoU_p,n of negatives
//      and the key of positives, each over the other class's list of its
//      image (no tile staging, no barrier). Each query's keys are split among
//      gridDim.y blocks, so that small batches still fill the GPU; partial
//      maxima meet in an atomicMax.
//   3. select_kernel, one block per image: class counts and key ranges, bin
//      counts, water-filling, sampling keys, the per-segment top-k by block
//      radix select, the epsilon weights and the ordered compaction into the
//      output row (every element written, padding included). Its first pass
//      stages each example's label and key in shared memory (when the image
//      fits), so the ten or so passes after it wait on shared memory, not on
//      global loads.
//
// Image-major order: image b owns positions [start(b), start(b+1)) with
// start(b) = proposal_splits[b] (+ gt_splits[b] with append_gt); its local
// example e is proposal row ps[b] + e for e < n_prop, then GT copy
// gs[b] + (e - n_prop). Ascending e is ascending global example id, so ties
// broken by the lower e are ties broken by the lower example id.
//
// The semantics and every tie-break are those of docs/ops.md and of the CPU
// kernel (cpp/sample_cpu.cpp); per-element arithmetic comes from
// sampling_math.h, so the two backends produce identical outputs (but for
// the last bit of log() in sampling keys: docs/ops.md).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/CallOnce.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <string>
#include <string_view>

#include "cuda_utils.cuh"
#include "sample_options.h"
#include "sampling_math.h"

namespace overlap_sampler {
namespace {

using gpu::kThreads;

constexpr int kPos = 0;  // class index of positives in per-class arrays
constexpr int kNeg = 1;  // ... and of negatives

// Where a class's selection key comes from.
constexpr int kKeyNone = 0;     // uniform: the key is never read
constexpr int kKeyOverlap = 1;  // IoU_p,n / positive key, from overlap_key_kernel
constexpr int kKeyIouGt = 2;    // iou_balanced: IoU_g,n, from match_kernel

// What an example's overlap key is the max over (overlap_key_kernel).
constexpr int kOverNothing = 0;
constexpr int kOverPositives = 1;
constexpr int kOverNegatives = 2;
constexpr int kOverAllOthers = 3;

// Positive segments (K bins or 1) then negative ones.
constexpr int kMaxSegments = 2 * kMaxBins;
// Segments resolved per pass over an image's examples (16 KB of histograms).
constexpr int kGroup = 16;

struct ImageLayout {
  const int64_t* proposal_splits;
  const int64_t* gt_splits;
  int64_t num_images;
  int64_t num_proposals;
  bool append_gt;

  __device__ __forceinline__ int64_t start(int64_t b) const {
    return proposal_splits[b] + (append_gt ? gt_splits[b] : 0);
  }
  __device__ __forceinline__ int64_t image_of(int64_t x) const {
    return gpu::find_item([this](int64_t b) { return start(b); }, num_images, x);
  }
};

__device__ __forceinline__ int class_of(int8_t label) {
  return label == kPositive ? kPos : (label == kNegative ? kNeg : -1);
}

// v[c] for a class c >= 0 known only at run time, by selection: indexing a
// per-class array with it would put the array in local memory.
template <typename T>
__device__ __forceinline__ T of_class(int c, const T (&v)[2]) {
  return c == kPos ? v[kPos] : v[kNeg];
}

// ---------------------------------------------------------------------------
// 0. With validate=false the splits were never read on the host: clamp them so
// that every image is a range inside its tensor and the ranges tile it (first
// 0, last the row count, each split in [previous split, row count]). Bad splits
// then give wrong samples, never an out-of-bounds access. One thread: B is
// small and this runs once per batch.
__global__ void clamp_splits_kernel(const int64_t* __restrict__ proposal_splits,
                                    const int64_t* __restrict__ gt_splits, int64_t num_images,
                                    int64_t num_proposals, int64_t num_gt,
                                    int64_t* __restrict__ out_proposal_splits,
                                    int64_t* __restrict__ out_gt_splits) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  out_proposal_splits[0] = 0;
  out_gt_splits[0] = 0;
  for (int64_t b = 1; b < num_images; ++b) {
    const int64_t p = proposal_splits[b];
    const int64_t g = gt_splits[b];
    const int64_t p_lo = out_proposal_splits[b - 1];
    const int64_t g_lo = out_gt_splits[b - 1];
    out_proposal_splits[b] = p < p_lo ? p_lo : (p > num_proposals ? num_proposals : p);
    out_gt_splits[b] = g < g_lo ? g_lo : (g > num_gt ? num_gt : g);
  }
  out_proposal_splits[num_images] = num_proposals;
  out_gt_splits[num_images] = num_gt;
}

// ---------------------------------------------------------------------------
// The examples that overlap keys are maxima over, listed by class per image,
// in one array of the batch's example count: image b's region [start(b),
// start(b+1)) holds its positives from the front and its negatives from the
// back (they never meet: an image has no more of both than examples); with
// pos_key_all the ignored examples too, among the negatives. Each
// entry is a box with its area and its example position. match_kernel appends
// through one atomic counter per image and class, so the order inside a list
// varies from run to run; the keys do not, since a max does not depend on
// the order of its terms.
template <typename acc_t>
struct KeyLists {
  acc_t* box;            // [4 * E]
  acc_t* area;           // [E]
  int64_t* example;      // [E] image-major position of the listed example
  unsigned int* count;   // [2 * B]: positives listed, others listed, per image
  bool with_ignored;     // ignored examples listed too (pos_key_all)
};

// ---------------------------------------------------------------------------
// 1. Matching.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    match_kernel(ImageLayout layout, int64_t num_examples, const scalar_t* __restrict__ proposals,
                 const scalar_t* __restrict__ gt_boxes, at::opmath_type<scalar_t> fg_thresh,
                 at::opmath_type<scalar_t> bg_thresh, int8_t* __restrict__ label,
                 int64_t* __restrict__ matched, at::opmath_type<scalar_t>* __restrict__ iou_gt,
                 double* __restrict__ overlap_key, KeyLists<at::opmath_type<scalar_t>> lists) {
  using acc_t = at::opmath_type<scalar_t>;
  OS_GRID_STRIDE_LOOP(x, num_examples) {
    const int64_t b = layout.image_of(x);
    const int64_t p0 = layout.proposal_splits[b];
    const int64_t n_prop = layout.proposal_splits[b + 1] - p0;
    const int64_t g0 = layout.gt_splits[b];
    const int64_t g1 = layout.gt_splits[b + 1];
    const int64_t e = x - layout.start(b);
    const bool is_copy = e >= n_prop;
    const scalar_t* src = is_copy ? gt_boxes + 4 * (g0 + (e - n_prop)) : proposals + 4 * (p0 + e);
    acc_t box[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) box[k] = static_cast<acc_t>(src[k]);
    acc_t best = acc_t(0);
    int64_t best_gt = -1;
    if (is_copy) {
      // A GT copy is matched to its own row (even if another GT is identical).
      best = gpu::box_iou(box, box);
      best_gt = g0 + (e - n_prop);
    } else {
      for (int64_t g = g0; g < g1; ++g) {
        acc_t gt[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) gt[k] = static_cast<acc_t>(gt_boxes[4 * g + k]);
        update_max(gpu::box_iou(box, gt), g, best, best_gt);
      }
    }
    // Thresholds compared in acc_t, as the CPU kernel; no GT -> never positive.
    int8_t l = kIgnored;
    if (is_copy || (best_gt >= 0 && best >= fg_thresh)) {
      l = kPositive;
    } else if (best < bg_thresh) {
      l = kNegative;
    }
    label[x] = l;
    matched[x] = best_gt;
    iou_gt[x] = best;
    if (overlap_key != nullptr) {
      overlap_key[x] = 0.0;  // "0 if none"; overlap_key_kernel maxes into it
      const bool listed = l != kIgnored || lists.with_ignored;
      const bool positive = l == kPositive;
      // One atomic per warp and list: the lanes appending to one list (same
      // image and class) take consecutive ranks from a single atomicAdd; one
      // atomic per lane serialised 2000 lanes of an image on each counter.
      const unsigned long long list = listed ? 2ull * b + (positive ? 0 : 1) : ~0ull;
      const unsigned int peers = __match_any_sync(__activemask(), list);
      const int leader = __ffs(peers) - 1;
      const int lane = static_cast<int>(threadIdx.x & 31);
      unsigned int base = 0;
      if (listed && lane == leader) base = atomicAdd(lists.count + list, __popc(peers));
      base = __shfl_sync(peers, base, leader);
      if (listed) {
        const unsigned int rank = base + __popc(peers & ((1u << lane) - 1u));
        const int64_t slot = positive ? layout.start(b) + rank : layout.start(b + 1) - 1 - rank;
#pragma unroll
        for (int k = 0; k < 4; ++k) lists.box[4 * slot + k] = box[k];
        lists.area[slot] = gpu::area_of(box);
        lists.example[slot] = x;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// 2. Overlap keys: for each listed example that needs one, the max IoU with
// the listed examples of the other class of its image (or with all others),
// one thread per list slot. Threads of one image and class walk the same keys
// in the same order, so a warp reads each key once (a broadcast) and only the
// warps at a class or image boundary diverge; no shared memory, no barrier.
// The keys of each query are split into gridDim.y chunks, one per block row,
// so that small batches still fill the GPU; partial maxima meet in an
// atomicMax on the key's bits (non-negative doubles order like their bits;
// acc_t -> double is exact and monotone), so neither the split nor the list
// order changes the result.
template <typename T>
__device__ __forceinline__ void load_box(const T* __restrict__ p, T (&box)[4]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) box[k] = __ldg(p + k);
}
template <>
__device__ __forceinline__ void load_box<float>(const float* __restrict__ p, float (&box)[4]) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));  // 16-byte aligned: a Workspace array
  box[0] = v.x;
  box[1] = v.y;
  box[2] = v.z;
  box[3] = v.w;
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    overlap_key_kernel(ImageLayout layout, int64_t num_examples, KeyLists<acc_t> lists,
                       const int8_t* __restrict__ label, bool negative_keys, bool positive_keys,
                       bool positive_key_all, double* __restrict__ overlap_key) {
  OS_GRID_STRIDE_LOOP(slot, num_examples) {
    const int64_t b = layout.image_of(slot);
    const int64_t x0 = layout.start(b);
    const int64_t x1 = layout.start(b + 1);
    const int64_t num_pos = __ldg(lists.count + 2 * b);
    const int64_t num_neg = __ldg(lists.count + 2 * b + 1);
    const int64_t neg0 = x1 - num_neg;  // first slot of the negatives (and ignored)
    int over = kOverNothing;
    if (slot < x0 + num_pos) {
      over = positive_keys ? (positive_key_all ? kOverAllOthers : kOverNegatives) : kOverNothing;
    } else if (slot >= neg0 && negative_keys &&
               (!lists.with_ignored || label[lists.example[slot]] == kNegative)) {
      over = kOverPositives;
    }
    if (over == kOverNothing) continue;  // a slot of the gap, or no key wanted
    // The keys as one index range [0, total), positives then negatives; this
    // block row takes chunk [lo, hi) of it, walked as (at most) two slot ranges.
    const int64_t first = over == kOverNegatives ? num_pos : 0;
    const int64_t total = over == kOverPositives ? num_pos : num_pos + num_neg;
    const int64_t chunk = (total - first + gridDim.y - 1) / gridDim.y;
    const int64_t lo = first + chunk * blockIdx.y;
    const int64_t hi = min(lo + chunk, total);
    acc_t box[4];
    load_box(lists.box + 4 * slot, box);
    const acc_t area = lists.area[slot];
    acc_t best = acc_t(0);  // "0 if none", as the CPU's sweep
    const int64_t ranges[2][2] = {{x0 + lo, x0 + min(hi, num_pos)},
                                  {neg0 + max(lo - num_pos, int64_t{0}), neg0 + (hi - num_pos)}};
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      for (int64_t k = ranges[r][0]; k < ranges[r][1]; ++k) {
        if (k == slot) continue;  // itself (kOverAllOthers only)
        acc_t key_box[4];
        load_box(lists.box + 4 * k, key_box);
        gpu::max_iou_into(box, area, key_box, __ldg(lists.area + k), best);
      }
    }
    // Computed in acc_t, then converted to double (docs/ops.md, step 3). A zero
    // (or NaN, never taken by the max) leaves match_kernel's +0.0.
    if (best > acc_t(0)) {
      atomicMax(reinterpret_cast<unsigned long long*>(overlap_key + lists.example[slot]),
                static_cast<unsigned long long>(__double_as_longlong(static_cast<double>(best))));
    }
  }
}

// ---------------------------------------------------------------------------
// 3. Selection and output, one block per image.
struct SelectParams {
  int64_t batch_size;
  int64_t positive_quota;
  int32_t strategy[2];    // [kPos], [kNeg]
  int32_t key_source[2];  // kKeyNone / kKeyOverlap / kKeyIouGt
  int32_t num_bins;
  double hard_thresh;
  bool fixed_upper;
  double bin_upper;
  double bg_iou_thresh;
  bool epsilon;  // pos_weight != 1: find each GT's best sampled proposal
  float pos_weight;
  int64_t cache_capacity;  // images of at most this many examples are staged
};

// Shared-memory bytes per staged example: the key slot (the class key's double
// bits, replaced by the sampling key in the segment pass), the segment and the
// label.
constexpr int64_t kStagedBytes = sizeof(unsigned long long) + sizeof(int16_t) + sizeof(int8_t);

// Blocks of select_kernel that should fit on a multiprocessor by registers
// (64 per thread): it runs one block per image, and batches of many images
// want several resident at once.
constexpr int kSelectMinBlocks = kThreads <= 512 ? 1024 / kThreads : 1;

template <typename acc_t>
__global__ void __launch_bounds__(kThreads, kSelectMinBlocks) select_kernel(
    ImageLayout layout, SelectParams p, const double* __restrict__ uniforms,
    const int8_t* __restrict__ label, const int64_t* __restrict__ matched,
    const acc_t* __restrict__ iou_gt, const double* __restrict__ overlap_key,
    // Workspaces written and re-read inside the block (no __restrict__/const:
    // they must not go through the read-only cache).
    unsigned long long* sampling_keys, int16_t* segment, unsigned long long* gt_best_iou,
    unsigned long long* gt_best_example,
    // Outputs: [B, batch_size] x 3, [B] x 2.
    int64_t* __restrict__ out_indices, int64_t* __restrict__ out_matched,
    float* __restrict__ out_weights, int64_t* __restrict__ out_num_pos,
    int64_t* __restrict__ out_num_neg) {
  __shared__ gpu::TopKState<kMaxSegments> state;
  __shared__ unsigned int hist[kGroup * 256];
  __shared__ unsigned long long bin_count[2 * kMaxBins];  // [class][bin]
  __shared__ long long count_scratch[gpu::kWarps];
  __shared__ double key_scratch[gpu::kWarps];
  __shared__ unsigned long long scan_scratch[gpu::kWarps];
  // Water-filling's per-bin arrays (thread 0): in shared memory, not a 1 KB
  // stack frame in local memory.
  __shared__ int64_t fill_count[kMaxBins];
  __shared__ int64_t fill_take[kMaxBins];
  // Staged examples, p.cache_capacity of each array (kStagedBytes each).
  extern __shared__ __align__(16) unsigned char staged[];

  const int K = p.num_bins;
  for (int64_t b = blockIdx.x; b < layout.num_images; b += gridDim.x) {
    __syncthreads();  // the previous image's readers of shared state are done
    const int64_t p0 = layout.proposal_splits[b];
    const int64_t n_prop = layout.proposal_splits[b + 1] - p0;
    const int64_t g0 = layout.gt_splits[b];
    const int64_t g1 = layout.gt_splits[b + 1];
    const int64_t x0 = layout.start(b);
    const int64_t n = layout.start(b + 1) - x0;
    const auto example_id = [&](int64_t e) {
      return e < n_prop ? p0 + e : layout.num_proposals + g0 + (e - n_prop);
    };
    // The image's label, key slot and segment of local example e: in shared
    // memory when the image fits (block-uniform), else in global memory (the
    // workspaces' range of the image). Every pass below maps e to thread
    // e % kThreads, so a thread reads back only what it wrote: no barrier
    // guards these arrays, and a pass that reads another thread's entries
    // needs a __syncthreads() first. Generic pointers, so one code path
    // serves both.
    const bool cached = n <= p.cache_capacity;
    const int64_t capacity = p.cache_capacity;
    unsigned long long* const keys =
        cached ? reinterpret_cast<unsigned long long*>(staged) : sampling_keys + x0;
    int16_t* const segments =
        cached ? reinterpret_cast<int16_t*>(staged + sizeof(unsigned long long) * capacity)
               : segment + x0;
    int8_t* const staged_labels = reinterpret_cast<int8_t*>(
        staged + (sizeof(unsigned long long) + sizeof(int16_t)) * capacity);
    const int8_t* const labels = cached ? staged_labels : label + x0;
    const auto staged_key = [&](int64_t e) { return __longlong_as_double(keys[e]); };

    const bool epsilon = p.epsilon && g1 > g0;
    if (epsilon) {
      for (int64_t g = g0 + threadIdx.x; g < g1; g += kThreads) {
        gt_best_iou[g] = 0ull;  // bits of +0.0; IoUs are >= +0.0
        gt_best_example[g] = ~0ull;
      }
    }

    // Class sizes and key ranges; stages the labels and the class keys. The
    // key sources are fixed per call, so an example's loads are issued
    // together (one global latency per iteration, not a label then a key).
    const bool reads_overlap =
        p.key_source[kPos] == kKeyOverlap || p.key_source[kNeg] == kKeyOverlap;
    const bool reads_iou_gt = p.key_source[kPos] == kKeyIouGt || p.key_source[kNeg] == kKeyIouGt;
    long long count_pos = 0, count_neg = 0;
    double max_pos = -INFINITY, max_neg = -INFINITY, min_pos = INFINITY, min_neg = INFINITY;
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
      const int8_t l = label[x0 + e];
      const double overlap = reads_overlap ? overlap_key[x0 + e] : 0.0;
      const double gt_iou = reads_iou_gt ? static_cast<double>(iou_gt[x0 + e]) : 0.0;
      const auto class_key = [&](int c) {
        const int source = p.key_source[c];
        return source == kKeyOverlap ? overlap : (source == kKeyIouGt ? gt_iou : 0.0);
      };
      if (cached) staged_labels[e] = l;
      const int c = class_of(l);
      if (c == kPos) {
        const double k = class_key(kPos);
        keys[e] = static_cast<unsigned long long>(__double_as_longlong(k));
        count_pos += 1;
        max_pos = gpu::MaxOp()(max_pos, k);
        min_pos = gpu::MinOp()(min_pos, k);
      } else if (c == kNeg) {
        const double k = class_key(kNeg);
        keys[e] = static_cast<unsigned long long>(__double_as_longlong(k));
        count_neg += 1;
        max_neg = gpu::MaxOp()(max_neg, k);
        min_neg = gpu::MinOp()(min_neg, k);
      }
    }
    const long long class_count[2] = {
        gpu::block_all_reduce(count_pos, gpu::SumOp(), count_scratch),
        gpu::block_all_reduce(count_neg, gpu::SumOp(), count_scratch)};
    const double key_max[2] = {gpu::block_all_reduce(max_pos, gpu::MaxOp(), key_scratch),
                               gpu::block_all_reduce(max_neg, gpu::MaxOp(), key_scratch)};
    const double key_min[2] = {gpu::block_all_reduce(min_pos, gpu::MinOp(), key_scratch),
                               gpu::block_all_reduce(min_neg, gpu::MinOp(), key_scratch)};

    // Quotas (docs/ops.md step 4).
    const long long qp = class_count[kPos] < p.positive_quota ? class_count[kPos]
                                                              : p.positive_quota;
    const long long neg_room = p.batch_size - qp;
    const long long qn = class_count[kNeg] < neg_room ? class_count[kNeg] : neg_room;
    const long long quota[2] = {qp, qn};

    // Binning of each class, as the CPU's select(): soft / iou_balanced bin
    // over [0, U] for their quotas; soft_reference over [min, max] for weights.
    bool binned[2];
    bool quota_bins[2];
    double bin_lo[2], bin_hi[2];
    int seg_base[2], seg_count[2];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int s = p.strategy[c];
      quota_bins[c] = uses_bin_quotas(s);
      binned[c] = quota[c] > 0 && (quota_bins[c] || s == kSoftReference);
      if (quota_bins[c]) {
        bin_lo[c] = 0.0;
        bin_hi[c] = p.fixed_upper ? p.bin_upper
                                  : (s == kIouBalanced ? p.bg_iou_thresh
                                                       : gpu::MaxOp()(0.0, key_max[c]));
      } else {
        bin_lo[c] = key_min[c];
        bin_hi[c] = key_max[c];
      }
      seg_count[c] = quota_bins[c] ? K : 1;
    }
    seg_base[kPos] = 0;
    seg_base[kNeg] = seg_count[kPos];
    const int num_segments = seg_count[kPos] + seg_count[kNeg];

    // Bin counts.
    if (binned[kPos] || binned[kNeg]) {  // block-uniform
      for (int j = threadIdx.x; j < 2 * kMaxBins; j += kThreads) bin_count[j] = 0ull;
      __syncthreads();
      for (int64_t base = 0; base < n; base += kThreads) {
        const int64_t e = base + threadIdx.x;
        int code = -1;
        if (e < n) {
          const int c = class_of(labels[e]);
          if (c >= 0 && of_class(c, binned)) {
            code = c * kMaxBins +
                   bin_index(staged_key(e), of_class(c, bin_lo), of_class(c, bin_hi), K);
          }
        }
        gpu::warp_aggregated_increment(bin_count, code);
      }
      __syncthreads();
    }

    // Segments: per-bin takes by water-filling, or one segment per class.
    if (threadIdx.x == 0) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        if (quota_bins[c]) {
          for (int k = 0; k < K; ++k) {
            fill_count[k] = binned[c] ? static_cast<int64_t>(bin_count[c * kMaxBins + k]) : 0;
            fill_take[k] = 0;
          }
          if (quota[c] > 0) water_fill(fill_count, K, quota[c], fill_take);
          for (int k = 0; k < K; ++k) {
            gpu::topk_init(state, seg_base[c] + k, fill_take[k], fill_count[k]);
          }
        } else {
          gpu::topk_init(state, seg_base[c], quota[c], class_count[c]);
        }
      }
    }
    __syncthreads();
    int64_t nonempty[2] = {0, 0};  // soft_reference: non-empty bins
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      if (binned[c] && !quota_bins[c]) {
        for (int k = 0; k < K; ++k) nonempty[c] += bin_count[c * kMaxBins + k] > 0 ? 1 : 0;
      }
    }

    // Segment of every example, and the sampling key of those in segments
    // that still have to be resolved (in the class key's slot).
    for (int64_t e = threadIdx.x; e < n; e += kThreads) {
      // Loaded first, whether needed or not (a valid index either way), so
      // that its global latency overlaps this iteration's shared reads.
      const double u = uniforms[example_id(e)];
      const int c = class_of(labels[e]);
      int seg = -1;
      if (c >= 0 && of_class(c, quota) > 0) {
        const int s = of_class(c, p.strategy);
        const bool class_quota_bins = of_class(c, quota_bins);
        const double key = staged_key(e);
        const int bin = of_class(c, binned)
                            ? bin_index(key, of_class(c, bin_lo), of_class(c, bin_hi), K)
                            : 0;
        seg = of_class(c, seg_base) + (class_quota_bins ? bin : 0);
        if (state.mode[seg] == gpu::kTopKPending) {
          double weight;
          if (class_quota_bins) {
            weight = 1.0;  // uniform inside a bin
          } else if (s == kSoftReference) {
            weight = 1.0 / (static_cast<double>(bin_count[c * kMaxBins + bin]) *
                            of_class(c, nonempty));
          } else {
            weight = strategy_weight(s, key, p.hard_thresh, 0.0);
          }
          keys[e] = sampling_key(u, weight);
        }
      }
      segments[e] = static_cast<int16_t>(seg);
    }

    const auto seg_of = [&](int64_t e) { return static_cast<int>(segments[e]); };
    const auto key_of = [&](int64_t e) { return keys[e]; };
    gpu::block_topk_resolve<kGroup>(n, num_segments, state, hist, seg_of, key_of);
    const auto selected = [&](int64_t e) {
      return gpu::topk_selected(state, seg_of(e), e, n, key_of);
    };

    // Epsilon: per GT, the selected non-copy positive with the largest IoU_g,e,
    // lowest e on ties: max of the IoU bits (non-negative doubles order like
    // their bits), then min of e among those holding it.
    if (epsilon) {  // block-uniform
      for (int64_t e = threadIdx.x; e < n_prop; e += kThreads) {
        const int64_t x = x0 + e;
        const int64_t g = matched[x];
        if (labels[e] == kPositive && g >= 0 && selected(e)) {
          atomicMax(&gt_best_iou[g], static_cast<unsigned long long>(
                                         __double_as_longlong(static_cast<double>(iou_gt[x]))));
        }
      }
      __syncthreads();
      for (int64_t e = threadIdx.x; e < n_prop; e += kThreads) {
        const int64_t x = x0 + e;
        const int64_t g = matched[x];
        if (labels[e] == kPositive && g >= 0 && selected(e)) {
          const unsigned long long bits = static_cast<unsigned long long>(
              __double_as_longlong(static_cast<double>(iou_gt[x])));
          if (__ldcg(&gt_best_iou[g]) == bits) {
            atomicMin(&gt_best_example[g], static_cast<unsigned long long>(e));
          }
        }
      }
      __syncthreads();
    }

    // Ordered compaction: positives at [0, qp), negatives at [qp, qp + qn),
    // each in ascending e; the two ranks travel packed in one scan.
    const int64_t row = b * p.batch_size;
    unsigned long long taken_pos = 0, taken_neg = 0;
    for (int64_t base = 0; base < n; base += kThreads) {
      const int64_t e = base + threadIdx.x;
      const int64_t x = x0 + e;
      bool take_pos = false, take_neg = false;
      if (e < n) {
        const int8_t l = labels[e];
        if (l != kIgnored && selected(e)) {
          take_pos = l == kPositive;
          take_neg = l == kNegative;
        }
      }
      unsigned long long total;
      const unsigned long long rank = gpu::block_exclusive_sum(
          (take_pos ? 1ull : 0ull) | (take_neg ? (1ull << 32) : 0ull), scan_scratch, &total);
      if (take_pos) {
        const int64_t col = static_cast<int64_t>(taken_pos + (rank & 0xffffffffull));
        const int64_t g = matched[x];
        const bool best = epsilon && e < n_prop && g >= 0 &&
                          __ldcg(&gt_best_example[g]) == static_cast<unsigned long long>(e);
        if (col < qp) {
          out_indices[row + col] = example_id(e);
          out_matched[row + col] = g;
          out_weights[row + col] = best ? p.pos_weight : 1.0f;
        }
      } else if (take_neg) {
        const int64_t col = qp + static_cast<int64_t>(taken_neg + (rank >> 32));
        if (col < qp + qn) {
          out_indices[row + col] = example_id(e);
          out_matched[row + col] = -1;
          out_weights[row + col] = 1.0f;
        }
      }
      taken_pos += total & 0xffffffffull;
      taken_neg += total >> 32;
    }
    for (int64_t col = qp + qn + threadIdx.x; col < p.batch_size; col += kThreads) {
      out_indices[row + col] = -1;
      out_matched[row + col] = -1;
      out_weights[row + col] = 0.0f;
    }
    if (threadIdx.x == 0) {
      out_num_pos[b] = qp;
      out_num_neg[b] = qn;
    }
  }
}

// Carves one byte buffer into aligned arrays (one allocation per call).
class Workspace {
 public:
  template <typename T>
  size_t reserve(int64_t count) {
    const size_t offset = bytes_;
    bytes_ += (static_cast<size_t>(count) * sizeof(T) + 15) / 16 * 16;
    return offset;
  }
  void allocate(const at::TensorOptions& options) {
    buffer_ = at::empty({static_cast<int64_t>(bytes_)}, options.dtype(at::kByte));
  }
  template <typename T>
  T* at(size_t offset) {
    return reinterpret_cast<T*>(buffer_.mutable_data_ptr<uint8_t>() + offset);
  }

 private:
  size_t bytes_ = 0;
  at::Tensor buffer_;
};

// Blocks along gridDim.y of overlap_key_kernel (chunks of each query's keys):
// enough, with the query blocks, for about 8 blocks per multiprocessor, and
// chunks of at least 64 keys of an average image. Only shapes are read (no
// sync); a short key list leaves some blocks idle, never wrong.
unsigned int key_splits(int64_t num_examples, int64_t num_images) {
  int device = 0;
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device));
  const int64_t query_blocks = gpu::grid_blocks(num_examples);
  const int64_t per_image = (num_examples + std::max<int64_t>(num_images, 1) - 1) /
                            std::max<int64_t>(num_images, 1);
  const int64_t chunks = std::max<int64_t>(per_image / 64, 1);
  const int64_t wanted = std::max<int64_t>(8 * int64_t{multiprocessors} / query_blocks, 1);
  return static_cast<unsigned int>(std::min<int64_t>({wanted, chunks, 65535}));
}

// Dynamic shared memory that select_kernel<acc_t> may use on the current
// device: all the device lets one block opt in to, beside the kernel's static
// arrays. Queried and opted in (cudaFuncSetAttribute) once per device: the
// runtime is reported to serialise that call with pending copies, so it stays
// off the hot path. c10::call_once, not std::call_once: a throwing first try
// may be retried without the libstdc++ hang.
template <typename acc_t>
int64_t select_dynamic_shared_bytes() {
  static std::array<c10::once_flag, C10_COMPILE_TIME_MAX_GPUS> opted_in;
  static std::array<int64_t, C10_COMPILE_TIME_MAX_GPUS> dynamic_bytes;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  TORCH_CHECK(device >= 0 && device < C10_COMPILE_TIME_MAX_GPUS, "overlap_sampler: CUDA device ",
              device, " beyond the ", C10_COMPILE_TIME_MAX_GPUS, " this build supports");
  c10::call_once(opted_in[device], [device] {
    cudaFuncAttributes attributes;
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, select_kernel<acc_t>));
    int optin_bytes = 0;
    C10_CUDA_CHECK(
        cudaDeviceGetAttribute(&optin_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    const int64_t bytes = std::max<int64_t>(
        int64_t{optin_bytes} - static_cast<int64_t>(attributes.sharedSizeBytes), 0);
    C10_CUDA_CHECK(cudaFuncSetAttribute(select_kernel<acc_t>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
    dynamic_bytes[device] = bytes;
  });
  return dynamic_bytes[device];
}

// Examples staged per image by select_kernel (p.cache_capacity): what fits in
// `dynamic_bytes`, but no more than twice the average image (at least 1024),
// rounded up to 256, so that batches of many small images keep several blocks
// per multiprocessor. Nothing when the average image does not fit: most images
// would then run from global memory anyway, and the reserved shared memory
// would only cut the blocks per multiprocessor. Only shapes are read (no
// sync); a larger image is served from global memory, never wrong.
// OVERLAP_SAMPLER_SELECT_STAGING=0 stages nothing (every image from global
// memory), so that tests and debugging can run the two paths on the same
// input; read per call.
int64_t select_cache_capacity(int64_t num_examples, int64_t num_images, int64_t dynamic_bytes) {
  const char* staging = std::getenv("OVERLAP_SAMPLER_SELECT_STAGING");
  if (staging != nullptr && std::string_view(staging) == "0") return 0;
  const int64_t images = std::max<int64_t>(num_images, 1);
  const int64_t average = (num_examples + images - 1) / images;
  const int64_t fits = dynamic_bytes / kStagedBytes;
  if (average > fits) return 0;
  const int64_t wanted = (std::max<int64_t>(2 * average, 1024) + 255) / 256 * 256;
  return std::min<int64_t>({fits, num_examples, wanted});
}

}  // namespace

SampleResult sample_from_uniforms_cuda(
    const at::Tensor& proposals, const at::Tensor& proposal_splits, const at::Tensor& gt_boxes,
    const at::Tensor& gt_splits, const at::Tensor& uniforms, int64_t batch_size_per_image,
    double positive_fraction, double fg_iou_thresh, double bg_iou_thresh, bool append_gt,
    c10::string_view neg_strategy, c10::string_view pos_strategy, int64_t num_bins,
    double hard_thresh, std::optional<double> bin_upper, double pos_weight,
    c10::string_view pos_key, bool validate) {
  const SampleOptions o = parse_sample_options(
      batch_size_per_image, positive_fraction, fg_iou_thresh, bg_iou_thresh, append_gt,
      std::string(neg_strategy), std::string(pos_strategy), num_bins, hard_thresh, bin_upper,
      pos_weight, std::string(pos_key));
  const int64_t num_examples =
      check_sample_inputs(proposals, proposal_splits, gt_boxes, gt_splits, uniforms,
                          batch_size_per_image, append_gt, validate);
  const c10::cuda::CUDAGuard guard(proposals.device());
  const int64_t num_images = proposal_splits.size(0) - 1;
  const int64_t width = o.batch_size_per_image;
  const auto long_options = proposals.options().dtype(at::kLong);
  at::Tensor indices = at::empty({num_images, width}, long_options);
  at::Tensor matched_gt = at::empty({num_images, width}, long_options);
  at::Tensor weights = at::empty({num_images, width}, proposals.options().dtype(at::kFloat));
  if (num_images == 0) {
    return {indices, matched_gt, weights, at::empty({0}, long_options),
            at::empty({0}, long_options)};
  }
  if (width == 0) {  // nothing sampled: only the (zero) counts to write
    return {indices, matched_gt, weights, at::zeros({num_images}, long_options),
            at::zeros({num_images}, long_options)};
  }
  at::Tensor num_pos = at::empty({num_images}, long_options);
  at::Tensor num_neg = at::empty({num_images}, long_options);

  const at::Tensor props = proposals.contiguous();
  const at::Tensor gts = gt_boxes.contiguous();
  const at::Tensor u = uniforms.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor ps = proposal_splits.contiguous();
  at::Tensor gs = gt_splits.contiguous();
  if (!validate) {
    at::Tensor clamped = at::empty({2, num_images + 1}, long_options);
    clamp_splits_kernel<<<1, 1, 0, stream>>>(
        ps.const_data_ptr<int64_t>(), gs.const_data_ptr<int64_t>(), num_images, props.size(0),
        gts.size(0), clamped[0].mutable_data_ptr<int64_t>(), clamped[1].mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ps = clamped[0];
    gs = clamped[1];
  }

  const bool negative_keys = o.neg_strategy != kUniform && o.neg_strategy != kIouBalanced;
  const bool positive_keys = o.pos_strategy != kUniform;
  SelectParams params;
  params.batch_size = width;
  params.positive_quota = o.positive_quota;
  params.strategy[kPos] = o.pos_strategy;
  params.strategy[kNeg] = o.neg_strategy;
  params.key_source[kPos] = positive_keys ? kKeyOverlap : kKeyNone;
  params.key_source[kNeg] = o.neg_strategy == kIouBalanced ? kKeyIouGt
                            : negative_keys                ? kKeyOverlap
                                                           : kKeyNone;
  params.num_bins = o.num_bins;
  params.hard_thresh = o.hard_thresh;
  params.fixed_upper = o.fixed_upper;
  params.bin_upper = o.bin_upper;
  params.bg_iou_thresh = o.bg_iou_thresh;
  params.epsilon = o.pos_weight != 1.0;
  params.pos_weight = static_cast<float>(o.pos_weight);

  const ImageLayout layout{ps.const_data_ptr<int64_t>(), gs.const_data_ptr<int64_t>(), num_images,
                           props.size(0), append_gt};
  const int64_t num_gt = gts.size(0);

  AT_DISPATCH_FLOATING_TYPES_AND_HALF(props.scalar_type(), "sample_from_uniforms_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Workspace ws;
    const size_t matched_at = ws.reserve<int64_t>(num_examples);
    const size_t overlap_key_at = ws.reserve<double>(num_examples);
    const size_t sampling_keys_at = ws.reserve<unsigned long long>(num_examples);
    const size_t gt_best_iou_at = ws.reserve<unsigned long long>(num_gt);
    const size_t gt_best_example_at = ws.reserve<unsigned long long>(num_gt);
    const bool any_keys = negative_keys || positive_keys;
    const int64_t listed = any_keys ? num_examples : 0;
    const size_t list_box_at = ws.reserve<acc_t>(4 * listed);
    const size_t list_area_at = ws.reserve<acc_t>(listed);
    const size_t list_example_at = ws.reserve<int64_t>(listed);
    const size_t list_count_at = ws.reserve<unsigned int>(any_keys ? 2 * num_images : 0);
    const size_t iou_gt_at = ws.reserve<acc_t>(num_examples);
    const size_t segment_at = ws.reserve<int16_t>(num_examples);
    const size_t label_at = ws.reserve<int8_t>(num_examples);
    ws.allocate(props.options());
    const KeyLists<acc_t> lists{ws.at<acc_t>(list_box_at), ws.at<acc_t>(list_area_at),
                                ws.at<int64_t>(list_example_at),
                                ws.at<unsigned int>(list_count_at), o.pos_key_all};

    if (num_examples > 0) {
      if (any_keys) {  // a memset, not a kernel; capturable in a CUDA graph
        C10_CUDA_CHECK(cudaMemsetAsync(lists.count, 0, 2 * num_images * sizeof(unsigned int),
                                       stream));
      }
      match_kernel<scalar_t><<<gpu::grid_blocks(num_examples), kThreads, 0, stream>>>(
          layout, num_examples, props.const_data_ptr<scalar_t>(), gts.const_data_ptr<scalar_t>(),
          static_cast<acc_t>(o.fg_iou_thresh), static_cast<acc_t>(o.bg_iou_thresh),
          ws.at<int8_t>(label_at), ws.at<int64_t>(matched_at), ws.at<acc_t>(iou_gt_at),
          any_keys ? ws.at<double>(overlap_key_at) : nullptr, lists);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (any_keys) {
        const dim3 grid(gpu::grid_blocks(num_examples), key_splits(num_examples, num_images));
        overlap_key_kernel<acc_t><<<grid, kThreads, 0, stream>>>(
            layout, num_examples, lists, ws.at<int8_t>(label_at), negative_keys, positive_keys,
            o.pos_key_all, ws.at<double>(overlap_key_at));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    params.cache_capacity = select_cache_capacity(num_examples, num_images,
                                                  select_dynamic_shared_bytes<acc_t>());
    const size_t staged_bytes = static_cast<size_t>(params.cache_capacity * kStagedBytes);
    select_kernel<acc_t><<<gpu::item_blocks(num_images), kThreads, staged_bytes, stream>>>(
        layout, params, u.const_data_ptr<double>(), ws.at<int8_t>(label_at),
        ws.at<int64_t>(matched_at), ws.at<acc_t>(iou_gt_at), ws.at<double>(overlap_key_at),
        ws.at<unsigned long long>(sampling_keys_at), ws.at<int16_t>(segment_at),
        ws.at<unsigned long long>(gt_best_iou_at), ws.at<unsigned long long>(gt_best_example_at),
        indices.mutable_data_ptr<int64_t>(), matched_gt.mutable_data_ptr<int64_t>(),
        weights.mutable_data_ptr<float>(), num_pos.mutable_data_ptr<int64_t>(),
        num_neg.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {indices, matched_gt, weights, num_pos, num_neg};
}

TORCH_LIBRARY_IMPL(overlap_sampler, CUDA, m) {
  m.impl("sample_from_uniforms", &sample_from_uniforms_cuda);
}

}  // namespace overlap_sampler
