// CPU top-k by sampling key: the `count` candidates with the largest
// sampling_key, ties to the lower id (the rule every backend follows).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace overlap_sampler {

struct KeyedCandidate {
  uint64_t key;
  int64_t id;
};

// Draw order: larger key first, then lower id.
inline bool drawn_before(const KeyedCandidate& a, const KeyedCandidate& b) {
  return a.key > b.key || (a.key == b.key && a.id < b.id);
}

// Moves the selected candidates to the front of `candidates` and returns how
// many there are (min(count, size)). With `ordered`, they are in draw order.
inline int64_t select_top(std::vector<KeyedCandidate>& candidates, int64_t count, bool ordered) {
  const int64_t n = static_cast<int64_t>(candidates.size());
  const int64_t take = std::min(count, n);
  if (take <= 0) return 0;
  if (take < n) {
    std::nth_element(candidates.begin(), candidates.begin() + (take - 1), candidates.end(),
                     drawn_before);
  }
  if (ordered) std::sort(candidates.begin(), candidates.begin() + take, drawn_before);
  return take;
}

}  // namespace overlap_sampler
