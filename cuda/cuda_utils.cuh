// Device helpers shared by the CUDA kernels: grid-stride loops, block-wide
// reductions and scans, warp-aggregated counters, and a block-wide top-k
// (radix select) over 64-bit keys with lowest-index tie-break.
//
// Every block-wide helper contains __syncthreads(): all threads of the block
// must call it, the same number of times, with blockDim.x == kThreads. Loops
// around them must therefore be block-uniform; the "tile" loops below iterate
// `for (base = 0; base < n; base += kThreads)` so that every thread (and every
// lane of a warp, for the warp intrinsics) runs the same iterations.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "sampling_math.h"

namespace overlap_sampler {
namespace gpu {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Threads of every block-per-item kernel of the library. A compile definition
// may override it (a benchmark knob; 32 * k up to 1024).
#ifndef OVERLAP_SAMPLER_CUDA_THREADS
#define OVERLAP_SAMPLER_CUDA_THREADS 256
#endif
constexpr int kThreads = OVERLAP_SAMPLER_CUDA_THREADS;
static_assert(kThreads % 32 == 0 && kThreads <= 1024, "threads per block: 32 * k, at most 1024");
constexpr int kWarps = kThreads / kWarpSize;

// Blocks for a grid-stride kernel over n items: enough to cover them, capped
// (the loop covers the rest) and never 0 (n == 0 launches nothing anyway).
inline unsigned int grid_blocks(int64_t n, int threads = kThreads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 1 << 16));
}

// Blocks for a block-per-item kernel (items looped inside the kernel).
inline unsigned int item_blocks(int64_t items) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(items, 1), 1 << 20));
}

}  // namespace gpu
}  // namespace overlap_sampler

// for (int64_t i = global thread id; i < n; i += grid size): 64-bit indices.
#define OS_GRID_STRIDE_LOOP(i, n)                                                      \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

namespace overlap_sampler {
namespace gpu {

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
// Written like std::max / std::min (a NaN argument keeps the other), as the
// CPU kernels write them.
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_all_reduce(T v, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = op(v, __shfl_xor_sync(kFullMask, v, offset));
  }
  return v;
}

// Reduction over the block; every thread gets the result. `scratch`: shared
// T[kWarps]. Only exact operations (integer sums, max, min) are used with it,
// so the result does not depend on the reduction order.
template <typename T, typename Op>
__device__ T block_all_reduce(T v, Op op, T* scratch) {
  v = warp_all_reduce(v, op);
  __syncthreads();  // earlier readers of scratch are done
  if ((threadIdx.x & (kWarpSize - 1)) == 0) scratch[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  T r = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, scratch[w]);
  return r;
}

// Exclusive prefix sum over the block in thread order; `*total` gets the sum
// of all threads. `scratch`: shared unsigned long long[kWarps]. Two counters
// can travel packed in the low and high 32 bits (each sum < 2^32).
__device__ inline unsigned long long block_exclusive_sum(unsigned long long v,
                                                         unsigned long long* scratch,
                                                         unsigned long long* total) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int warp = threadIdx.x / kWarpSize;
  unsigned long long inclusive = v;
#pragma unroll
  for (int offset = 1; offset < kWarpSize; offset <<= 1) {
    const unsigned long long up = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += up;
  }
  __syncthreads();  // earlier readers of scratch are done
  if (lane == kWarpSize - 1) scratch[warp] = inclusive;
  __syncthreads();
  unsigned long long before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const unsigned long long s = scratch[w];
    before += w < warp ? s : 0ull;
    sum += s;
  }
  *total = sum;
  return before + inclusive - v;
}

// counters[code] += 1 for every lane with code >= 0, one shared-memory atomic
// per distinct code of the warp (keys of one segment pile up on few digits, so
// plain atomics would serialise). Every lane of the warp must call it.
template <typename Counter>
__device__ __forceinline__ void warp_aggregated_increment(Counter* counters, int code) {
  const unsigned peers = __match_any_sync(kFullMask, code);
  const int leader = __ffs(peers) - 1;
  if (code >= 0 && (threadIdx.x & (kWarpSize - 1)) == leader) {
    atomicAdd(&counters[code], static_cast<Counter>(__popc(peers)));
  }
}

// ---------------------------------------------------------------------------
// Block-wide top-k over segments.
//
// Elements i in [0, n) carry a segment (or none) and a 64-bit key. Segment s
// selects the `take` elements with the largest key, ties to the lower index i;
// equivalently the largest composite (key, rank) with rank = n - 1 - i, which
// is unique. A radix select resolves it most significant byte first: 8 passes
// over the key bytes, then, only for segments whose threshold key is shared by
// more elements than it still needs, passes over the bytes of the rank. A
// segment stops as soon as every element sharing its current prefix is needed
// (usually after 3 key passes), so the selected set is
//   (key & key_mask) >  key_prefix, or
//   (key & key_mask) == key_prefix and (rank & rank_mask) >= rank_prefix.
// The elements are re-read every pass through seg_of / key_of (shared or
// global memory, the caller's choice), so segments of any size work; up to
// kGroup segments share one pass over the elements.

enum TopKMode : int {
  kTopKNone = 0,      // take == 0
  kTopKAll = 1,       // take >= count: everything, no key needed
  kTopKResolved = 2,  // the prefix rule above
  kTopKPending = 3,   // still being resolved
};

template <int kMaxSegments>
struct TopKState {
  unsigned long long key_prefix[kMaxSegments];
  unsigned long long key_mask[kMaxSegments];
  unsigned long long rank_prefix[kMaxSegments];
  unsigned long long rank_mask[kMaxSegments];
  long long remaining[kMaxSegments];  // still to take among the prefix matches
  int mode[kMaxSegments];
};

// One thread per segment; __syncthreads() before block_topk_resolve reads it.
// `count` must be the exact number of elements whose segment is s.
template <int kMaxSegments>
__device__ inline void topk_init(TopKState<kMaxSegments>& st, int s, long long take,
                                 long long count) {
  st.mode[s] = take <= 0 ? kTopKNone : (take >= count ? kTopKAll : kTopKPending);
  st.remaining[s] = take;
  st.key_prefix[s] = 0;
  st.key_mask[s] = 0;
  st.rank_prefix[s] = 0;
  st.rank_mask[s] = 0;
}

// Is an element of segment s (mode Resolved) selected? rank = n - 1 - i.
template <int kMaxSegments>
__device__ __forceinline__ bool topk_prefix_selected(const TopKState<kMaxSegments>& st, int s,
                                                     unsigned long long key,
                                                     unsigned long long rank) {
  const unsigned long long high = key & st.key_mask[s];
  if (high != st.key_prefix[s]) return high > st.key_prefix[s];
  return (rank & st.rank_mask[s]) >= st.rank_prefix[s];
}

// Is element i (of n) with segment s selected? Reads the key only when the
// mode needs it (keys of None/All segments may never have been written).
template <int kMaxSegments, typename KeyOf>
__device__ __forceinline__ bool topk_selected(const TopKState<kMaxSegments>& st, int s, int64_t i,
                                              int64_t n, KeyOf key_of) {
  if (s < 0) return false;
  const int mode = st.mode[s];
  if (mode == kTopKNone) return false;
  if (mode == kTopKAll) return true;
  return topk_prefix_selected(st, s, key_of(i), static_cast<unsigned long long>(n - 1 - i));
}

// Resolves every Pending segment in [0, num_segments). seg_of(i): segment of
// element i, negative for none; key_of(i): its key (called only for elements
// of Pending segments). hist: shared unsigned int[kGroup * 256]. Starts and
// ends with __syncthreads(), so the caller's topk_init writes are visible and
// the final state is visible to every thread on return.
template <int kGroup, int kMaxSegments, typename SegOf, typename KeyOf>
__device__ void block_topk_resolve(int64_t n, int num_segments, TopKState<kMaxSegments>& st,
                                   unsigned int* hist, SegOf seg_of, KeyOf key_of) {
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int warp = threadIdx.x / kWarpSize;
  // Rank digits: only as many bytes as n - 1 has.
  int rank_bytes = 1;
  while (rank_bytes < 8 && (static_cast<unsigned long long>(n - 1) >> (8 * rank_bytes)) != 0) {
    ++rank_bytes;
  }
  for (int g0 = 0; g0 < num_segments; g0 += kGroup) {
    const int group = min(kGroup, num_segments - g0);
    for (int pass = 0; pass < 8 + rank_bytes; ++pass) {
      __syncthreads();  // last pass's state visible, its histogram readers done
      bool pending = false;
      for (int s = 0; s < group; ++s) pending |= st.mode[g0 + s] == kTopKPending;
      if (!pending) break;  // block-uniform: everyone read the same state
      for (int j = threadIdx.x; j < kGroup * 256; j += kThreads) hist[j] = 0u;
      __syncthreads();
      const bool key_pass = pass < 8;
      const int shift = key_pass ? 56 - 8 * pass : 8 * (rank_bytes - 1 - (pass - 8));
      for (int64_t base = 0; base < n; base += kThreads) {
        const int64_t i = base + threadIdx.x;
        int code = -1;
        if (i < n) {
          const int local = seg_of(i) - g0;
          if (local >= 0 && local < group && st.mode[g0 + local] == kTopKPending) {
            const int s = g0 + local;
            const unsigned long long key = key_of(i);
            const unsigned long long rank = static_cast<unsigned long long>(n - 1 - i);
            if ((key & st.key_mask[s]) == st.key_prefix[s] &&
                (rank & st.rank_mask[s]) == st.rank_prefix[s]) {
              const unsigned long long v = key_pass ? key : rank;
              code = local * 256 + static_cast<int>((v >> shift) & 0xffull);
            }
          }
        }
        warp_aggregated_increment(hist, code);
      }
      __syncthreads();
      // One warp per segment: find the digit holding the remaining-th largest
      // element. Lane l sums digits [248 - 8l, 255 - 8l], highest lane first.
      for (int local = warp; local < group; local += kWarps) {
        const int s = g0 + local;
        if (st.mode[s] != kTopKPending) continue;  // warp-uniform
        const unsigned int* h = hist + local * 256;
        unsigned int c[8];
        unsigned int sum = 0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          c[j] = h[255 - 8 * lane - j];
          sum += c[j];
        }
        unsigned int inclusive = sum;
#pragma unroll
        for (int offset = 1; offset < kWarpSize; offset <<= 1) {
          const unsigned int up = __shfl_up_sync(kFullMask, inclusive, offset);
          if (lane >= offset) inclusive += up;
        }
        const long long need = st.remaining[s];
        const unsigned ballot =
            __ballot_sync(kFullMask, static_cast<long long>(inclusive) >= need);
        // Every lane has read mode/remaining before one lane rewrites them:
        // __ballot_sync orders no memory, __syncwarp does (racecheck's hazard).
        __syncwarp();
        // ballot != 0 whenever `count` in topk_init was right; otherwise the
        // segment stays Pending and is read with its prefix so far.
        if (ballot != 0 && lane == __ffs(ballot) - 1) {
          // The first of this lane's digits (highest first) that reaches
          // `need`; unrolled, so c[] stays in registers.
          long long above = static_cast<long long>(inclusive - sum);
          int j = 7;
          unsigned int count_j = c[7];
#pragma unroll
          for (int k = 0; k < 7; ++k) {
            if (j != 7) continue;
            if (above + c[k] >= need) {
              j = k;
              count_j = c[k];
            } else {
              above += c[k];
            }
          }
          const unsigned long long digit = static_cast<unsigned long long>(255 - 8 * lane - j);
          if (key_pass) {
            st.key_prefix[s] |= digit << shift;
            st.key_mask[s] |= 0xffull << shift;
          } else {
            st.rank_prefix[s] |= digit << shift;
            st.rank_mask[s] |= 0xffull << shift;
          }
          st.remaining[s] = need - above;
          if (need - above == static_cast<long long>(count_j)) st.mode[s] = kTopKResolved;
        }
      }
    }
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------
// IoU without floating-point contraction.
//
// nvcc contracts a * b + c into one FMA by default (-fmad=true), and does so in
// box_iou_pair: area(a) + area(b) becomes fma(w_a, h_a, area(b)), rounded once
// instead of twice, so GPU IoUs would differ from the CPU's in the last bit and
// flip thresholds and ties. No pragma turns contraction off in nvcc, so the
// shared box_iou_pair is instantiated with a number type whose operators are
// the _rn intrinsics, which are IEEE-rounded and never fused: the same formula,
// the CPU's rounding, whatever the build flags.
template <typename T>
struct UnfusedOps;
template <>
struct UnfusedOps<float> {
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
  __device__ static float sub(float a, float b) { return __fsub_rn(a, b); }
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  __device__ static float div(float a, float b) { return __fdiv_rn(a, b); }
};
template <>
struct UnfusedOps<double> {
  __device__ static double add(double a, double b) { return __dadd_rn(a, b); }
  __device__ static double sub(double a, double b) { return __dsub_rn(a, b); }
  __device__ static double mul(double a, double b) { return __dmul_rn(a, b); }
  __device__ static double div(double a, double b) { return __ddiv_rn(a, b); }
};

template <typename T>
struct Unfused {
  T v;
  Unfused() = default;
  __device__ Unfused(T x) : v(x) {}
  __device__ explicit Unfused(int x) : v(static_cast<T>(x)) {}
  __device__ friend Unfused operator+(Unfused a, Unfused b) { return UnfusedOps<T>::add(a.v, b.v); }
  __device__ friend Unfused operator-(Unfused a, Unfused b) { return UnfusedOps<T>::sub(a.v, b.v); }
  __device__ friend Unfused operator*(Unfused a, Unfused b) { return UnfusedOps<T>::mul(a.v, b.v); }
  __device__ friend Unfused operator/(Unfused a, Unfused b) { return UnfusedOps<T>::div(a.v, b.v); }
  __device__ friend bool operator>(Unfused a, Unfused b) { return a.v > b.v; }
  __device__ friend bool operator<(Unfused a, Unfused b) { return a.v < b.v; }
};

// box_area of an acc_t box, rounded exactly as on the CPU. (Not named
// box_area: argument-dependent lookup would make the shared one ambiguous.)
template <typename T>
__device__ __forceinline__ T area_of(const T* b) {
  const Unfused<T> x[4] = {b[0], b[1], b[2], b[3]};
  return overlap_sampler::box_area(x).v;
}

// box_iou_pair(a, b) of two acc_t boxes with their areas (area_of), rounded
// exactly as on the CPU: the one IoU of every CUDA kernel. Inner loops that
// meet each box many times compute the areas once.
template <typename T>
__device__ __forceinline__ T box_iou(const T* a, T a_area, const T* b, T b_area) {
  using U = Unfused<T>;
  return box_iou_unpacked(U(a[0]), U(a[1]), U(a[2]), U(a[3]), U(a_area), U(b[0]), U(b[1]),
                          U(b[2]), U(b[3]), U(b_area))
      .v;
}

// Running max of box_iou(query, key) over keys, dividing only the pairs that
// may raise it: a pair whose intersection is below best * union (less a
// margin far above the two roundings of that product) has an IoU <= best,
// since rounding is monotone, so skipping its division changes no bit. Most
// overlapping pairs of an image are skipped once best is up. Divided pairs go
// through box_iou's own formula (same terms, same rounding, same NaN rule).
template <typename T>
__device__ __forceinline__ void max_iou_into(const T (&a)[4], T a_area, const T (&b)[4], T b_area,
                                             T& best) {
  using U = Unfused<T>;
  const InterUnion<U> terms = box_inter_union(U(a[0]), U(a[1]), U(a[2]), U(a[3]), U(a_area),
                                              U(b[0]), U(b[1]), U(b[2]), U(b[3]), U(b_area));
  const T inter = terms.inter.v;
  const T uni = terms.uni.v;
  if (!((inter > T(0)) & (uni > T(0)))) return;  // IoU 0 (NaN terms too): never above best
  const T bound = best * uni * T(0.99999);
  if (inter >= bound || bound < std::numeric_limits<T>::min()) {  // tiny products: no margin proof
    const T iou = (terms.inter / terms.uni).v;
    best = iou > best ? iou : best;
  }
}

template <typename T>
__device__ __forceinline__ T box_iou(const T* a, const T* b) {
  return box_iou(a, area_of(a), b, area_of(b));
}

// Binary search: the largest b in [0, count) with start(b) <= i, for
// non-decreasing starts (empty items share a start with their successor).
template <typename Start>
__device__ __forceinline__ int64_t find_item(Start start, int64_t count, int64_t i) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (start(mid) <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

}  // namespace gpu
}  // namespace overlap_sampler
