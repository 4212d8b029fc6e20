// The ops called from C++ through the dispatcher, as a C++ user (or a
// TorchScript model loaded with torch::jit::load) reaches them.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <set>
#include <tuple>

namespace {

using SampleResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

c10::OperatorHandle op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

at::Tensor boxes(std::initializer_list<float> values) {
  return at::tensor(std::vector<float>(values)).view({-1, 4});
}

TEST(Dispatcher, EveryOpIsRegisteredForCpu) {
  for (const char* name :
       {"overlap_sampler::box_iou", "overlap_sampler::max_iou", "overlap_sampler::assign_bins",
        "overlap_sampler::weighted_sample", "overlap_sampler::sample",
        "overlap_sampler::sample_from_uniforms"}) {
    const auto handle = op(name);
    EXPECT_TRUE(handle.hasKernelForDispatchKey(c10::DispatchKey::CPU) ||
                handle.hasKernelForDispatchKey(c10::DispatchKey::CompositeExplicitAutograd))
        << name;
  }
}

TEST(Dispatcher, BoxIouHandComputed) {
  const auto box_iou =
      op("overlap_sampler::box_iou").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const at::Tensor a = boxes({0, 0, 10, 10, 5, 5, 15, 15});
  const at::Tensor iou = box_iou.call(a, a);
  EXPECT_FLOAT_EQ(iou[0][1].item<float>(), 25.0f / 175.0f);
  EXPECT_FLOAT_EQ(iou[1][1].item<float>(), 1.0f);
}

TEST(Dispatcher, BadInputRaisesValueError) {
  const auto box_iou =
      op("overlap_sampler::box_iou").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  EXPECT_THROW(box_iou.call(at::ones({3, 5}), at::ones({3, 4})), c10::ValueError);
  EXPECT_THROW(box_iou.call(at::ones({3, 4}, at::kLong), at::ones({3, 4})), c10::TypeError);
}

TEST(Dispatcher, SampleInvariants) {
  using Fn = SampleResult(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, int64_t, double, double, double, bool,
                          c10::string_view, c10::string_view, int64_t, double,
                          std::optional<double>, double, std::optional<at::Generator>,
                          c10::string_view, bool);
  const auto sample = op("overlap_sampler::sample").typed<Fn>();
  at::manual_seed(0);
  // Two images: 60 and 40 proposals around 3 and 2 GT boxes.
  const at::Tensor gt = boxes({0, 0, 20, 20, 10, 10, 40, 30, 50, 50, 90, 80, 0, 0, 30, 30, 20, 0, 50, 40});
  const at::Tensor picks = at::cat({at::randint(0, 3, {60}), at::randint(3, 5, {40})});
  at::Tensor proposals = gt.index_select(0, picks) + at::randn({100, 4}) * 4.0;
  proposals = at::cat({at::minimum(proposals.slice(1, 0, 2), proposals.slice(1, 2, 4)),
                       at::maximum(proposals.slice(1, 0, 2), proposals.slice(1, 2, 4))}, 1);
  const at::Tensor ps = at::tensor({0L, 60L, 100L});
  const at::Tensor gs = at::tensor({0L, 3L, 5L});
  for (const char* strategy : {"uniform", "hard", "soft", "soft_reference", "linear", "iou_balanced"}) {
    const auto [indices, matched, weights, num_pos, num_neg] =
        sample.call(proposals, ps, gt, gs, 32, 0.25, 0.5, 0.5, true, strategy, "soft", 2, 0.5,
                    std::nullopt, 2.0, std::nullopt, "negatives", true);
    ASSERT_EQ(indices.sizes(), (at::IntArrayRef{2, 32}));
    for (int64_t b = 0; b < 2; ++b) {
      const int64_t p = num_pos[b].item<int64_t>(), n = num_neg[b].item<int64_t>();
      EXPECT_LE(p, 8);
      EXPECT_LE(p + n, 32);
      std::set<int64_t> seen;
      for (int64_t c = 0; c < 32; ++c) {
        const int64_t id = indices[b][c].item<int64_t>();
        if (c >= p + n) {
          EXPECT_EQ(id, -1);
          EXPECT_EQ(weights[b][c].item<float>(), 0.0f);
          continue;
        }
        EXPECT_TRUE(seen.insert(id).second) << "duplicate " << id;
        const bool in_proposals = id >= ps[b].item<int64_t>() && id < ps[b + 1].item<int64_t>();
        const bool in_gt = id >= 100 + gs[b].item<int64_t>() && id < 100 + gs[b + 1].item<int64_t>();
        EXPECT_TRUE(in_proposals || in_gt) << strategy << " id " << id << " image " << b;
        EXPECT_EQ(matched[b][c].item<int64_t>() >= 0, c < p);
      }
    }
  }
}

}  // namespace
