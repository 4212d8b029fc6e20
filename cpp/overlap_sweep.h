// CPU max-IoU search by an x-sweep: the boxes of one image are sorted by x1
// once; a query then visits only boxes whose x-interval can overlap its own
// (x1 in [q.x1 - widest box, q.x2)), which skips most pairs of a detection
// batch. Exact: pruned pairs have IoU 0 (the lower bound keeps a margin for
// rounding, see lowest_x1), so results equal the unpruned CUDA kernels'.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "sampling_math.h"
#include "vector_clones.h"

namespace overlap_sampler {

// Boxes as one array per coordinate (x1, y1, x2, y2) and their areas.
template <typename T>
struct BoxColumns {
  const T* x1;
  const T* y1;
  const T* x2;
  const T* y2;
  const T* area;
};

// best[r] = max(best[r], IoU(box r, key)) for r in [first, last): one
// contiguous pass that the compiler vectorises. Always inlined, so each clone
// of its caller vectorises it for its own instruction set.
template <typename T>
OS_ALWAYS_INLINE inline void max_iou_into(BoxColumns<T> boxes, int64_t first, int64_t last,
                                          const T* key, T* best) {
  const T kx1 = key[0], ky1 = key[1], kx2 = key[2], ky2 = key[3];
  const T k_area = box_area(key);
#pragma omp simd
  for (int64_t r = first; r < last; ++r) {
    const T iou = box_iou_unpacked(boxes.x1[r], boxes.y1[r], boxes.x2[r], boxes.y2[r],
                                   boxes.area[r], kx1, ky1, kx2, ky2, k_area);
    best[r] = iou > best[r] ? iou : best[r];
  }
}

// max_iou_into that also returns the max of the IoUs it computes (0 if none):
// with the negatives swept and a positive as the key, one pass over the pairs
// yields both the negatives' running maxima and the positive's own key.
template <typename T>
OS_ALWAYS_INLINE inline T max_iou_into_and_max(BoxColumns<T> boxes, int64_t first, int64_t last,
                                               const T* key, T* best) {
  const T kx1 = key[0], ky1 = key[1], kx2 = key[2], ky2 = key[3];
  const T k_area = box_area(key);
  T key_best = T(0);
#pragma omp simd reduction(max : key_best)
  for (int64_t r = first; r < last; ++r) {
    const T iou = box_iou_unpacked(boxes.x1[r], boxes.y1[r], boxes.x2[r], boxes.y2[r],
                                   boxes.area[r], kx1, ky1, kx2, ky2, k_area);
    best[r] = iou > best[r] ? iou : best[r];
    key_best = iou > key_best ? iou : key_best;
  }
  return key_best;
}

// max over r in [first, last) of IoU(query, box r), 0 if none: branch-free,
// vectorised, always inlined like max_iou_into. Same arithmetic as
// box_iou_pair(query, box r).
template <typename T>
OS_ALWAYS_INLINE inline T max_iou_of(BoxColumns<T> boxes, int64_t first, int64_t last,
                                     const T* q) {
  const T qx1 = q[0], qy1 = q[1], qx2 = q[2], qy2 = q[3];
  const T q_area = box_area(q);
  T best = T(0);
  // `iou > best` never takes a NaN, so the lanes' maxima combine in any order.
#pragma omp simd reduction(max : best)
  for (int64_t r = first; r < last; ++r) {
    const T iou = box_iou_unpacked(qx1, qy1, qx2, qy2, q_area, boxes.x1[r], boxes.y1[r],
                                   boxes.x2[r], boxes.y2[r], boxes.area[r]);
    best = iou > best ? iou : best;
  }
  return best;
}

template <typename T>
class OverlapSweep {
 public:
  // boxes: 4 values per key; ids: the key's id reported back (any order).
  void reset(const T* boxes, const int64_t* ids, int64_t count) {
    // Sorted as packed (x1, index) pairs, not indices through a comparator
    // that reads the boxes: 7% of the main case. The order among equal x1
    // changes no result (maxima are exact; query()'s ties go to the lowest id
    // whatever the order). NaN x1 (only with validate=false) sorts last as
    // +inf: std::sort needs a strict weak order. As the *second* box of
    // box_iou_pair (a key), such a box has IoU 0 or NaN, never a max, with
    // +inf as with NaN; queries with a NaN are not swept (sample_cpu.cpp
    // compares them with every key).
    order_.resize(count);
    for (int64_t k = 0; k < count; ++k) order_[k] = {sort_x1(boxes[4 * k]), k};
    std::sort(order_.begin(), order_.end());
    sorted_.resize(4 * count);
    sorted_ids_.resize(count);
    x1_.resize(count);
    y1_.resize(count);
    x2_.resize(count);
    y2_.resize(count);
    area_.resize(count);
    max_width_ = T(0);
    lowest_ids_[0] = lowest_ids_[1] = -1;
    for (int64_t r = 0; r < count; ++r) {
      const int64_t k = order_[r].second;
      std::copy(boxes + 4 * k, boxes + 4 * k + 4, sorted_.begin() + 4 * r);
      sorted_ids_[r] = ids[k];
      x1_[r] = sort_x1(boxes[4 * k]);
      y1_[r] = boxes[4 * k + 1];
      x2_[r] = boxes[4 * k + 2];
      y2_[r] = boxes[4 * k + 3];
      area_[r] = box_area(boxes + 4 * k);
      max_width_ = std::max(max_width_, boxes[4 * k + 2] - boxes[4 * k]);
      insert_lowest(ids[k]);
    }
  }

  int64_t size() const { return static_cast<int64_t>(sorted_ids_.size()); }
  // Id of the box in sorted position r.
  int64_t id(int64_t r) const { return sorted_ids_[r]; }

  // Key-major use, with the *queries* in the sweep: best[r] = max(best[r],
  // IoU(box r, key)) for every box r (sorted position) that the key's
  // x-interval can meet. One contiguous, vectorised pass per key; max is
  // exact, so any key order gives max_value's results, bit for bit (same
  // operations: min/max and the area sum are exact whatever the order).
  // The swept queries must be NaN-free (see reset).
  OS_VECTOR_CLONES void max_into(const T* key, T* best) const {
    const auto [first, last] = candidates(key[0], key[2]);
    max_iou_into(columns(), first, last, key, best);
  }

  // max_into, returning also the key's own max IoU with the swept boxes it can
  // meet (those it cannot meet have IoU 0): the max over all of them.
  OS_VECTOR_CLONES T max_into_and_max(const T* key, T* best) const {
    const auto [first, last] = candidates(key[0], key[2]);
    return max_iou_into_and_max(columns(), first, last, key, best);
  }

  // Max IoU of `query` with every key, value only: the sampler's keys need no
  // argmax, and without it the loop is branch-free over contiguous arrays, so
  // the compiler vectorises it. Same arithmetic as box_iou_pair(query, key).
  OS_VECTOR_CLONES T max_value(const T* q) const {
    const auto [first, last] = candidates(q[0], q[2]);
    return max_iou_of(columns(), first, last, q);
  }

  // Max IoU of `query` with every key whose id != skip_id; lowest id on ties;
  // (0, -1) when there is no such key.
  void query(const T* q, int64_t skip_id, T& best, int64_t& best_id) const {
    best = T(0);
    best_id = -1;
    const auto [first, last] = candidates(q[0], q[2]);
    for (int64_t r = first; r < last; ++r) {
      if (sorted_ids_[r] == skip_id) continue;
      const T iou = box_iou_pair(q, sorted_.data() + 4 * r);
      if (iou > T(0)) update_max(iou, sorted_ids_[r], best, best_id);
    }
    if (best_id < 0) {
      // Every eligible key has IoU 0: the lowest id is the argmax.
      best_id = lowest_ids_[0] != skip_id ? lowest_ids_[0] : lowest_ids_[1];
    }
  }

 private:
  BoxColumns<T> columns() const {
    return {x1_.data(), y1_.data(), x2_.data(), y2_.data(), area_.data()};
  }

  static T sort_x1(T x1) { return x1 == x1 ? x1 : std::numeric_limits<T>::infinity(); }

  // Sorted positions [first, last) of the boxes whose x-interval can meet [x1, x2).
  std::pair<int64_t, int64_t> candidates(T x1, T x2) const {
    const auto first = std::lower_bound(x1_.begin(), x1_.end(), lowest_x1(x1));
    const auto last = std::lower_bound(first, x1_.end(), x2);
    return {first - x1_.begin(), last - x1_.begin()};
  }

  // Boxes starting below this cannot meet an interval starting at x: their x2
  // is below x. x - widest would do in exact arithmetic; the margin (far above
  // rounding, far below box sizes) keeps a pair whose IoU rounds above 0.
  T lowest_x1(T x) const {
    const T bound = x - max_width_;
    return bound - (std::abs(bound) + max_width_) * T(1e-4);
  }

  void insert_lowest(int64_t id) {
    if (lowest_ids_[0] < 0 || id < lowest_ids_[0]) {
      lowest_ids_[1] = lowest_ids_[0];
      lowest_ids_[0] = id;
    } else if (lowest_ids_[1] < 0 || id < lowest_ids_[1]) {
      lowest_ids_[1] = id;
    }
  }

  std::vector<std::pair<T, int64_t>> order_;  // (x1, box), in sweep order
  std::vector<T> sorted_;
  std::vector<int64_t> sorted_ids_;
  std::vector<T> x1_, y1_, x2_, y2_, area_;  // sorted by x1, one array per coordinate
  T max_width_ = T(0);
  int64_t lowest_ids_[2] = {-1, -1};
};

}  // namespace overlap_sampler
