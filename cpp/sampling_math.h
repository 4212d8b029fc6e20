// Per-element formulas shared by the CPU and CUDA kernels. Everything here is
// `inline` and host+device, so the CPU tests exercise exactly the arithmetic
// the GPU runs (docs/ops.md states the semantics).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define OS_HOST_DEVICE __host__ __device__
#else
#define OS_HOST_DEVICE
#endif

namespace overlap_sampler {

// Example labels produced by GT matching.
constexpr int8_t kNegative = 0;
constexpr int8_t kPositive = 1;
constexpr int8_t kIgnored = -1;

// Sampling strategies, in the order the `sample` op parses their names.
enum Strategy : int32_t {
  kUniform = 0,
  kHard = 1,
  kSoft = 2,
  kSoftReference = 3,
  kLinear = 4,
  kIouBalanced = 5,
};

// Largest K accepted: per-bin counters live in registers/shared memory.
constexpr int kMaxBins = 64;

// IoU of two (x1, y1, x2, y2) boxes, modern convention (no +1), equal to
// torchvision.ops.box_iou. A zero union (degenerate boxes) gives 0, never NaN.
template <typename T>
OS_HOST_DEVICE inline T box_area(const T* b) {
  const T w = b[2] - b[0];
  const T h = b[3] - b[1];
  // Branch-free (no &&) so loops over boxes vectorise; 0 * x keeps +0.
  return (w > T(0) ? w : T(0)) * (h > T(0) ? h : T(0));
}

// How box_iou_unpacked turns intersection and union into the IoU. Dense:
// inter / uni, 0 when the union is not positive (degenerate boxes, NaN or
// infinite terms). Sparse: the same value, but disjoint boxes (inter = +0,
// most pairs) skip the division, the costliest step, and a zero dividend is a
// special case of CUDA's IEEE division. The two agree bit for bit on every
// (inter, uni) the formula can produce: inter is +0, positive, +inf or NaN
// (an infinite side times 0), never -0, and uni is NaN whenever inter is.
// The GPU takes the sparse form; the CPU's vectorised loops compute every lane
// anyway, and there the extra test cost 18%. Test: BoxIou.SparseFormChangesNoBit.
#if defined(__CUDA_ARCH__)
constexpr bool kSparseIou = true;
#else
constexpr bool kSparseIou = false;
#endif

// The IoU on unpacked coordinates with the areas given (box_area): the form
// the CPU's vectorised loops call over one array per coordinate. Which box is
// `a` matters only for NaN coordinates (a comparison with NaN picks b's side).
// Its two terms, intersection and union, for a loop that tests a pair before
// it divides (CUDA's overlap keys divide only a pair that may raise a max).
template <typename T>
struct InterUnion {
  T inter;
  T uni;
};

template <typename T>
OS_HOST_DEVICE inline InterUnion<T> box_inter_union(T ax1, T ay1, T ax2, T ay2, T a_area, T bx1,
                                                    T by1, T bx2, T by2, T b_area) {
  const T left = ax1 > bx1 ? ax1 : bx1;
  const T top = ay1 > by1 ? ay1 : by1;
  const T right = ax2 < bx2 ? ax2 : bx2;
  const T bottom = ay2 < by2 ? ay2 : by2;
  const T w = right - left;
  const T h = bottom - top;
  const T inter = (w > T(0) ? w : T(0)) * (h > T(0) ? h : T(0));
  return {inter, a_area + b_area - inter};
}

template <typename T, bool kSparse = kSparseIou>
OS_HOST_DEVICE inline T box_iou_unpacked(T ax1, T ay1, T ax2, T ay2, T a_area, T bx1, T by1, T bx2,
                                         T by2, T b_area) {
  const InterUnion<T> terms =
      box_inter_union(ax1, ay1, ax2, ay2, a_area, bx1, by1, bx2, by2, b_area);
  const T inter = terms.inter;
  const T uni = terms.uni;
  if (kSparse) {
    // `&`, not `&&`: no short-circuit branch.
    return (inter > T(0)) & (uni > T(0)) ? inter / uni : T(0);
  }
  return uni > T(0) ? inter / uni : T(0);
}

template <typename T>
OS_HOST_DEVICE inline T box_iou_pair(const T* a, const T* b) {
  return box_iou_unpacked(a[0], a[1], a[2], a[3], box_area(a), b[0], b[1], b[2], b[3], box_area(b));
}

// Running max with the "lowest index wins ties" rule used for every argmax.
template <typename T>
OS_HOST_DEVICE inline void update_max(T value, int64_t index, T& best, int64_t& best_index) {
  if (value > best || (value == best && (best_index < 0 || index < best_index))) {
    best = value;
    best_index = index;
  }
}

// Bin of `key` among K equal bins over [lower, upper]; the upper end itself
// and anything above it fall in the top bin, anything at or below `lower` in
// bin 0. An empty range (all keys equal) puts everything in bin 0. The scaled
// key is clamped before the int conversion: a key far above a tiny upper bound
// scales past INT_MAX (undefined; INT_MIN on x86, an out-of-range bin), and
// inf/inf (key and upper both +inf) is NaN; both go to the top bin.
OS_HOST_DEVICE inline int bin_index(double key, double lower, double upper, int num_bins) {
  if (!(upper > lower) || !(key > lower)) return 0;
  const double scaled = (key - lower) / (upper - lower) * num_bins;
  return scaled < num_bins - 1 ? static_cast<int>(scaled) : num_bins - 1;
}

// Sort key for Efraimidis-Spirakis successive sampling without replacement:
// larger keys are drawn first. The top two bits hold a tier so that
//   weight == +inf  -> tier 2, drawn before everything else ("always first"),
//   weight  > 0     -> tier 1, key log(u) / w (same order as u^(1/w)),
//   weight == 0     -> tier 0, drawn only once tiers 1-2 are exhausted.
// Inside tiers 0 and 2 members are uniform (key log(u)). The low 62 bits are
// the order-preserving bit pattern of the negative double key; equal keys are
// broken by the lower example index, by the caller.
OS_HOST_DEVICE inline uint64_t sampling_key(double u, double weight) {
  uint64_t tier = 1;
  double w = weight;
  if (w == 0.0) {
    tier = 0;
    w = 1.0;
  } else if (w > 1.0e308) {  // +inf
    tier = 2;
    w = 1.0;
  }
  // The platform's log (glibc / libdevice): may differ in the last bit.
  double key = (u > 0.0 ? log(u) : -INFINITY) / w;  // <= 0
  if (!(key < 0.0)) key = -0.0;                     // log(1) or NaN guard
  uint64_t bits;
  // memcpy-free bit cast that nvcc and host compilers both accept.
  union {
    double d;
    uint64_t u;
  } cast;
  cast.d = key;
  bits = cast.u;
  // key <= 0: the sign bit is set, so ~bits orders larger keys higher and has a
  // zero top bit; keep 62 significant bits below the tier.
  const uint64_t ordered = (~bits) >> 1;
  return (tier << 62) | ordered;
}

// Positive quota of one image: round(batch_size * fraction), as docs/ops.md.
OS_HOST_DEVICE inline int64_t positive_quota(int64_t batch_size, double fraction) {
  return static_cast<int64_t>(floor(static_cast<double>(batch_size) * fraction + 0.5));
}

// Water-filling of `quota` over K bins holding counts[k] candidates: every bin
// gets the same level t (the largest with sum(min(count, t)) <= quota), then
// the remainder goes one each to the bins still holding more than t, highest
// bin (most overlapped) first. The result never exceeds a bin's count and sums
// to min(quota, total).
OS_HOST_DEVICE inline void water_fill(const int64_t* counts, int num_bins, int64_t quota,
                                      int64_t* take) {
  int64_t total = 0;
  int64_t max_count = 0;
  for (int k = 0; k < num_bins; ++k) {
    total += counts[k];
    max_count = counts[k] > max_count ? counts[k] : max_count;
  }
  if (quota >= total) {
    for (int k = 0; k < num_bins; ++k) take[k] = counts[k];
    return;
  }
  // Binary search the level: filled(t) = sum(min(count, t)) is monotone.
  int64_t lo = 0, hi = max_count;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    int64_t filled = 0;
    for (int k = 0; k < num_bins; ++k) filled += counts[k] < mid ? counts[k] : mid;
    if (filled <= quota) lo = mid; else hi = mid - 1;
  }
  int64_t remaining = quota;
  for (int k = 0; k < num_bins; ++k) {
    take[k] = counts[k] < lo ? counts[k] : lo;
    remaining -= take[k];
  }
  for (int k = num_bins - 1; k >= 0 && remaining > 0; --k) {
    if (counts[k] > lo) {
      take[k] += 1;
      remaining -= 1;
    }
  }
}

// The weight a strategy gives one candidate, before Efraimidis-Spirakis keys.
// `bin_share` is only used by soft_reference: 1 / (candidates in its bin *
// non-empty bins), i.e. equal probability mass per bin.
OS_HOST_DEVICE inline double strategy_weight(int strategy, double key, double hard_thresh,
                                             double bin_share) {
  switch (strategy) {
    case kHard:
      return key >= hard_thresh ? INFINITY : 1.0;
    case kLinear:
      return key > 0.0 ? key : 0.0;
    case kSoftReference:
      return bin_share;
    default:  // uniform, soft, iou_balanced: uniform inside their bins
      return 1.0;
  }
}

// Strategies with exact per-bin quotas (water-filling) rather than one draw.
OS_HOST_DEVICE inline bool uses_bin_quotas(int strategy) {
  return strategy == kSoft || strategy == kIouBalanced;
}

}  // namespace overlap_sampler
