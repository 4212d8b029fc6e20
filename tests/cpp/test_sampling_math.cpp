// The per-element formulas shared by the CPU and CUDA kernels.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// The GPU's iou_of_areas_sparse skips the division for disjoint boxes; its
// value must be, bit for bit, the CPU's iou_of_areas (inter / union, 0 for a
// union <= 0 or NaN), whatever the boxes: infinite, NaN, zero-sized or tiny
// coordinates included.
TEST(BoxIou, SparseFormChangesNoBit) {
  const float inf = INFINITY;
  const float values[] = {0.0f, -0.0f, 1e-30f, 1e-20f, 0.5f, 1.0f, 3.0f, 1e20f, inf, -inf, NAN};
  std::mt19937 rng(0);
  std::uniform_int_distribution<int> pick(0, sizeof(values) / sizeof(values[0]) - 1);
  std::uniform_real_distribution<float> corner(0.0f, 4.0f);
  std::uniform_real_distribution<float> side(0.0f, 3.0f);
  std::uniform_int_distribution<int> which(0, 7);
  int divided = 0;
  for (int trial = 0; trial < 200000; ++trial) {
    float box[8];  // a then b: well-formed boxes, then one coordinate special
    for (float* c : {box, box + 4}) {
      c[0] = corner(rng);
      c[1] = corner(rng);
      c[2] = c[0] + side(rng);
      c[3] = c[1] + side(rng);
    }
    if (trial % 2) box[which(rng)] = values[pick(rng)];
    const float* a = box;
    const float* b = box + 4;
    // The kernels' intersection (a comparison with NaN takes b's side).
    const float w = (a[2] < b[2] ? a[2] : b[2]) - (a[0] > b[0] ? a[0] : b[0]);
    const float h = (a[3] < b[3] ? a[3] : b[3]) - (a[1] > b[1] ? a[1] : b[1]);
    const float inter = (w > 0 ? w : 0.0f) * (h > 0 ? h : 0.0f);
    const float uni = os::box_area(a) + os::box_area(b) - inter;
    const float dense = os::iou_of_areas(inter, uni);
    const float sparse = os::iou_of_areas_sparse(inter, uni);
    ASSERT_FALSE(std::isnan(dense)) << "trial " << trial;
    uint32_t dense_bits, sparse_bits;
    std::memcpy(&dense_bits, &dense, 4);
    std::memcpy(&sparse_bits, &sparse, 4);
    ASSERT_EQ(sparse_bits, dense_bits) << "trial " << trial << ": " << inter << " / " << uni;
    ASSERT_EQ(os::box_iou_pair(a, b), dense) << "trial " << trial;
    divided += inter > 0 && uni > 0;
  }
  EXPECT_GT(divided, 20000);  // both sides of the test were exercised
  EXPECT_LT(divided, 180000);
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
}

TEST(PositiveQuota, RoundsHalfUp) {
  EXPECT_EQ(os::positive_quota(512, 0.25), 128);
  EXPECT_EQ(os::positive_quota(10, 0.25), 3);  // 2.5 -> 3
  EXPECT_EQ(os::positive_quota(7, 0.0), 0);
  EXPECT_EQ(os::positive_quota(7, 1.0), 7);
}

// The straightforward water-filling of algorithm.md: equal shares, unused
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
