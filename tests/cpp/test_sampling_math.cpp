// The per-element formulas shared by the CPU and CUDA kernels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "sampling_math.h"

namespace os = overlap_sampler;

TEST(BoxIou, HandComputedPairs) {
  const float a[4] = {0, 0, 10, 10};
  const float b[4] = {5, 5, 15, 15};
  EXPECT_FLOAT_EQ(os::box_iou_pair(a, b), 25.0f / 175.0f);
  EXPECT_FLOAT_EQ(os::box_iou_pair(a, a), 1.0f);
  const float far[4] = {20, 20, 30, 30};
  EXPECT_EQ(os::box_iou_pair(a, far), 0.0f);
  const float touching[4] = {10, 0, 20, 10};  // shares an edge: zero intersection
  EXPECT_EQ(os::box_iou_pair(a, touching), 0.0f);
}

TEST(BoxIou, DegenerateBoxesGiveZeroNotNan) {
  const double point[4] = {3, 3, 3, 3};
  const double line[4] = {0, 0, 0, 10};
  EXPECT_EQ(os::box_iou_pair(point, point), 0.0);
  EXPECT_EQ(os::box_iou_pair(point, line), 0.0);
  const double inverted[4] = {10, 10, 0, 0};
  EXPECT_EQ(os::box_area(inverted), 0.0);
}

// The GPU's sparse IoU (no division for disjoint boxes) must equal the CPU's
// dense one bit for bit: every combination of 9 values for all 8 coordinates
// (43M pairs per type), which reaches subnormal, infinite and NaN
// intersections, -0 and +0, empty, partial and full overlaps.
template <typename T>
void expect_sparse_equals_dense() {
  const T inf = std::numeric_limits<T>::infinity();
  const T values[] = {-inf, T(-1), T(-0.0), T(0), std::numeric_limits<T>::denorm_min(),
                      T(1), std::numeric_limits<T>::max(), inf, std::numeric_limits<T>::quiet_NaN()};
  constexpr int kValues = sizeof(values) / sizeof(values[0]);
  int64_t divided = 0, subnormal_inter = 0, nan_inter = 0, infinite_inter = 0, mismatches = 0;
  int index[8] = {0};
  for (;;) {
    T a[4], b[4];
    for (int k = 0; k < 4; ++k) {
      a[k] = values[index[k]];
      b[k] = values[index[4 + k]];
    }
    const T a_area = os::box_area(a), b_area = os::box_area(b);
    const T dense = os::box_iou_unpacked<T, false>(a[0], a[1], a[2], a[3], a_area, b[0], b[1], b[2],
                                                   b[3], b_area);
    const T sparse = os::box_iou_unpacked<T, true>(a[0], a[1], a[2], a[3], a_area, b[0], b[1], b[2],
                                                   b[3], b_area);
    mismatches += std::memcmp(&dense, &sparse, sizeof(T)) != 0;
    // What the cases reached (the intersection as the formula computes it).
    const T w = (a[2] < b[2] ? a[2] : b[2]) - (a[0] > b[0] ? a[0] : b[0]);
    const T h = (a[3] < b[3] ? a[3] : b[3]) - (a[1] > b[1] ? a[1] : b[1]);
    const T inter = (w > T(0) ? w : T(0)) * (h > T(0) ? h : T(0));
    divided += dense > T(0);
    subnormal_inter += std::fpclassify(inter) == FP_SUBNORMAL;
    nan_inter += std::isnan(inter);
    infinite_inter += std::isinf(inter);
    int k = 0;
    while (k < 8 && ++index[k] == kValues) index[k++] = 0;
    if (k == 8) break;
  }
  EXPECT_EQ(mismatches, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(subnormal_inter, 0);
  EXPECT_GT(nan_inter, 0);
  EXPECT_GT(infinite_inter, 0);
}

TEST(BoxIou, SparseFormChangesNoBit) {
  expect_sparse_equals_dense<float>();
  expect_sparse_equals_dense<double>();
}

TEST(UpdateMax, LowestIndexWinsTies) {
  float best = 0.0f;
  int64_t index = -1;
  os::update_max(0.5f, 7, best, index);
  os::update_max(0.5f, 3, best, index);
  os::update_max(0.5f, 9, best, index);
  EXPECT_EQ(index, 3);
  os::update_max(0.6f, 12, best, index);
  EXPECT_EQ(index, 12);
}

TEST(BinIndex, EqualBinsWithMaxInTopBin) {
  EXPECT_EQ(os::bin_index(0.0, 0.0, 0.6, 2), 0);
  EXPECT_EQ(os::bin_index(0.29, 0.0, 0.6, 2), 0);
  EXPECT_EQ(os::bin_index(0.31, 0.0, 0.6, 2), 1);
  EXPECT_EQ(os::bin_index(0.6, 0.0, 0.6, 2), 1);   // the max itself
  EXPECT_EQ(os::bin_index(0.9, 0.0, 0.7, 3), 2);   // beyond a fixed upper bound
  EXPECT_EQ(os::bin_index(0.4, 0.4, 0.4, 4), 0);   // all keys equal
  EXPECT_EQ(os::bin_index(0.55, 0.1, 0.5, 2), 1);  // soft_reference range
  EXPECT_EQ(os::bin_index(0.25, 0.1, 0.5, 2), 0);
  // A key exactly on an inner edge belongs to the bin above it (bins are [lo, hi)).
  EXPECT_EQ(os::bin_index(0.25, 0.0, 0.5, 2), 1);
  EXPECT_EQ(os::bin_index(0.5, 0.0, 2.0, 4), 1);
  EXPECT_EQ(os::bin_index(1.5, 0.0, 2.0, 4), 3);
}

// Keys that scale past INT_MAX (a tiny fixed upper bound) and inf / inf fall
// in the top bin, as every key above the upper bound does.
TEST(BinIndex, KeysFarAboveTheUpperBoundStayInTheTopBin) {
  EXPECT_EQ(os::bin_index(3e9, 0.0, 1.0, 4), 3);
  EXPECT_EQ(os::bin_index(1e20, 0.0, 1.0, 4), 3);
  EXPECT_EQ(os::bin_index(0.5, 0.0, 1e-12, 64), 63);
  EXPECT_EQ(os::bin_index(1.0, 0.0, 1e-300, 2), 1);
  EXPECT_EQ(os::bin_index(INFINITY, 0.0, 1.0, 3), 2);
  EXPECT_EQ(os::bin_index(INFINITY, 0.0, INFINITY, 3), 2);  // inf / inf is NaN
  EXPECT_EQ(os::bin_index(0.5, 0.0, INFINITY, 3), 0);
}

TEST(PositiveQuota, RoundsHalfUp) {
  EXPECT_EQ(os::positive_quota(512, 0.25), 128);
  EXPECT_EQ(os::positive_quota(10, 0.25), 3);  // 2.5 -> 3
  EXPECT_EQ(os::positive_quota(7, 0.0), 0);
  EXPECT_EQ(os::positive_quota(7, 1.0), 7);
}

// The straightforward water-filling of docs/ops.md (the paper's Eq. 2): equal shares, unused
// shares spread again over bins with candidates left, one unit at a time.
static std::vector<int64_t> water_fill_by_units(const std::vector<int64_t>& counts, int64_t quota) {
  std::vector<int64_t> take(counts.size(), 0);
  const int K = static_cast<int>(counts.size());
  int64_t left = quota;
  while (left > 0) {
    std::vector<int> open;
    for (int k = 0; k < K; ++k) {
      if (take[k] < counts[k]) open.push_back(k);
    }
    if (open.empty()) break;
    // Every open bin receives one unit while enough remain; the last partial
    // round goes to the highest (most overlapped) open bins first.
    if (left >= static_cast<int64_t>(open.size())) {
      for (int k : open) take[k] += 1;
      left -= static_cast<int64_t>(open.size());
    } else {
      for (int i = static_cast<int>(open.size()) - 1; i >= 0 && left > 0; --i, --left) {
        take[open[i]] += 1;
      }
    }
  }
  return take;
}

TEST(WaterFill, MatchesUnitByUnitFilling) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 5000; ++trial) {
    const int K = 1 + static_cast<int>(rng() % 6);
    std::vector<int64_t> counts(K);
    for (auto& c : counts) c = rng() % 40;
    const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    const int64_t quota = rng() % (total + 10);
    std::vector<int64_t> take(K);
    os::water_fill(counts.data(), K, quota, take.data());
    ASSERT_EQ(take, water_fill_by_units(counts, quota)) << "trial " << trial;
    ASSERT_EQ(std::accumulate(take.begin(), take.end(), int64_t{0}), std::min(quota, total));
  }
}

TEST(WaterFill, PaperExample) {
  const int64_t counts[2] = {1000, 40};  // few highly overlapped negatives
  int64_t take[2];
  os::water_fill(counts, 2, 384, take);
  EXPECT_EQ(take[0], 344);
  EXPECT_EQ(take[1], 40);
}

TEST(SamplingKey, OrderFollowsUniformAndWeight) {
  // Within a tier, key order = order of u^(1/w).
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int i = 0; i < 10000; ++i) {
    const double u1 = unit(rng), u2 = unit(rng), w1 = 0.01 + unit(rng), w2 = 0.01 + unit(rng);
    const double k1 = std::pow(u1, 1.0 / w1), k2 = std::pow(u2, 1.0 / w2);
    if (std::abs(std::log(k1) - std::log(k2)) < 1e-12) continue;
    ASSERT_EQ(os::sampling_key(u1, w1) > os::sampling_key(u2, w2), k1 > k2);
  }
}

TEST(SamplingKey, TiersDominate) {
  const double inf = INFINITY;
  // Always-first beats any finite weight, which beats zero weight.
  EXPECT_GT(os::sampling_key(1e-300, inf), os::sampling_key(0.999999, 1e9));
  EXPECT_GT(os::sampling_key(1e-300, 1e-9), os::sampling_key(0.999999, 0.0));
  // Inside the zero and infinite tiers, members are ordered by u (uniform).
  EXPECT_GT(os::sampling_key(0.7, 0.0), os::sampling_key(0.2, 0.0));
  EXPECT_GT(os::sampling_key(0.7, inf), os::sampling_key(0.2, inf));
  // u = 0 is the smallest key of its tier, and never NaN-ordered.
  EXPECT_LT(os::sampling_key(0.0, 1.0), os::sampling_key(1e-300, 1.0));
}

TEST(StrategyWeight, PerStrategy) {
  EXPECT_EQ(os::strategy_weight(os::kUniform, 0.9, 0.5, 0.0), 1.0);
  EXPECT_EQ(os::strategy_weight(os::kHard, 0.5, 0.5, 0.0), INFINITY);
  EXPECT_EQ(os::strategy_weight(os::kHard, 0.49, 0.5, 0.0), 1.0);
  EXPECT_EQ(os::strategy_weight(os::kLinear, 0.3, 0.5, 0.0), 0.3);
  EXPECT_EQ(os::strategy_weight(os::kLinear, 0.0, 0.5, 0.0), 0.0);
  EXPECT_EQ(os::strategy_weight(os::kSoftReference, 0.3, 0.5, 0.125), 0.125);
  EXPECT_TRUE(os::uses_bin_quotas(os::kSoft));
  EXPECT_TRUE(os::uses_bin_quotas(os::kIouBalanced));
  EXPECT_FALSE(os::uses_bin_quotas(os::kHard));
}
