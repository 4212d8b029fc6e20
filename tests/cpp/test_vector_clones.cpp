// The library's sweep loops run as the clone the CPU picks (vector_clones.h).
// Here the same loops (max_iou_into, max_iou_of) are compiled once per
// instruction set of those clones and must give the same bits on boxes with
// partial overlaps, ties, -0, subnormal and huge coordinates.
#include <gtest/gtest.h>

#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "overlap_sweep.h"

namespace os = overlap_sampler;

namespace {

template <typename T>
struct Case {
  std::vector<T> x1, y1, x2, y2, area, keys;  // keys: 4 values each
  os::BoxColumns<T> columns() const {
    return {x1.data(), y1.data(), x2.data(), y2.data(), area.data()};
  }
};

template <typename T>
Case<T> make_case(int boxes, int keys, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<T> corner(T(0), T(100)), side(T(0), T(60));
  std::uniform_int_distribution<int> special(0, 19);
  const T odd[] = {T(-0.0), std::numeric_limits<T>::denorm_min(), std::numeric_limits<T>::max(),
                   T(50), T(1e-30)};
  Case<T> c;
  std::vector<T> box(4);
  const auto draw = [&]() {
    box[0] = corner(rng);
    box[1] = corner(rng);
    box[2] = box[0] + side(rng);
    box[3] = box[1] + side(rng);
    const int s = special(rng);
    if (s < 5) box[s % 4] = odd[s];  // a quarter of the boxes get an odd coordinate
  };
  for (int i = 0; i < boxes; ++i) {
    draw();
    c.x1.push_back(box[0]);
    c.y1.push_back(box[1]);
    c.x2.push_back(box[2]);
    c.y2.push_back(box[3]);
    c.area.push_back(os::box_area(box.data()));
  }
  for (int k = 0; k < keys; ++k) {
    draw();
    c.keys.insert(c.keys.end(), box.begin(), box.end());
  }
  return c;
}

// Both loops, inlined into one copy per instruction set (run_avx2, ...):
// every max_iou_into result and every max_iou_of value.
template <typename T>
OS_ALWAYS_INLINE inline void run_loops(const Case<T>& c, std::vector<T>& out) {
  const int64_t n = static_cast<int64_t>(c.x1.size());
  std::vector<T> best(n, T(0));
  for (size_t k = 0; k + 4 <= c.keys.size(); k += 4) {
    os::max_iou_into(c.columns(), 0, n, c.keys.data() + k, best.data());
    out.push_back(os::max_iou_of(c.columns(), 0, n, c.keys.data() + k));
    out.push_back(os::max_iou_of(c.columns(), static_cast<int64_t>(k / 4) % n, n, c.keys.data() + k));
  }
  out.insert(out.end(), best.begin(), best.end());
}

template <typename T>
std::vector<T> run_baseline(const Case<T>& c) {
  std::vector<T> out;
  run_loops(c, out);
  return out;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define OS_HAVE_ISA_COPIES 1
template <typename T>
__attribute__((target("avx2"))) std::vector<T> run_avx2(const Case<T>& c) {
  std::vector<T> out;
  run_loops(c, out);
  return out;
}
template <typename T>
__attribute__((target("avx512f"))) std::vector<T> run_avx512(const Case<T>& c) {
  std::vector<T> out;
  run_loops(c, out);
  return out;
}
#endif

template <typename T>
void expect_same_bits(const std::vector<T>& a, const std::vector<T>& b, const char* isa) {
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(T)), 0) << isa << " differs";
}

template <typename T>
void check_every_isa() {
  // 203 boxes: odd counts leave scalar and masked remainders in every width.
  const Case<T> c = make_case<T>(203, 64, 7);
  const std::vector<T> baseline = run_baseline(c);
  int positive = 0;
  for (const T v : baseline) positive += v > T(0) && v < T(1);
  ASSERT_GT(positive, 100);  // partial overlaps reach the division
#ifdef OS_HAVE_ISA_COPIES
  if (__builtin_cpu_supports("avx2")) expect_same_bits(baseline, run_avx2(c), "avx2");
  if (__builtin_cpu_supports("avx512f")) expect_same_bits(baseline, run_avx512(c), "avx512f");
#endif
}

}  // namespace

TEST(VectorClones, SweepLoopsGiveTheSameBitsOnEveryInstructionSet) {
  check_every_isa<float>();
  check_every_isa<double>();
}
