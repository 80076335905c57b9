// The balanced planner against hand-worked placements and invariants.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <stdexcept>
#include <vector>

#include "core/plan/planner.h"

using namespace memwarden::plan;

namespace {

// embed, (attn, experts x E) x L, head
std::vector<Item> moe_model(int layers, int experts, int64_t attn, int64_t expert, int64_t embed, int64_t head) {
  std::vector<Item> items;
  items.push_back({embed, -1, false});
  for (int l = 0; l < layers; ++l) {
    items.push_back({attn, l, false});
    for (int e = 0; e < experts; ++e) items.push_back({expert, l, true});
  }
  items.push_back({head, layers, false});
  return items;
}

void check_invariants(const std::vector<Item>& items, const std::vector<Device>& devices, const Result& r) {
  ASSERT_EQ(r.device.size(), items.size());
  std::vector<int64_t> load(devices.size(), 0);
  int last = -1;
  for (size_t i = 0; i < items.size(); ++i) {
    ASSERT_GE(r.device[i], 0);
    ASSERT_LT(r.device[i], static_cast<int>(devices.size()));
    load[r.device[i]] += items[i].bytes;
    if (!items[i].free) {  // pipeline order
      EXPECT_GE(r.device[i], last) << "item " << i;
      last = r.device[i];
    }
  }
  EXPECT_EQ(load, r.load);
  for (size_t d = 0; d < devices.size(); ++d) EXPECT_LE(load[d], devices[d].capacity) << "device " << d;
}

}  // namespace

TEST(Planner, TwoEqualDevicesBalanceExactlyWhenGranularityAllows) {
  // 4 layers x 4 experts of 10, attn 2, embed 3, head 3: total 4*(2+40)+6 = 174 -> 87 each.
  auto items = moe_model(4, 4, 2, 10, 3, 3);
  std::vector<Device> devices{{100, false}, {100, false}};
  Result r = plan(items, devices);
  ASSERT_TRUE(r.feasible) << r.message;
  check_invariants(items, devices, r);
  EXPECT_EQ(r.load[0], 87);
  EXPECT_EQ(r.load[1], 87);
  EXPECT_DOUBLE_EQ(r.imbalance, 0.0);
  EXPECT_EQ(r.device.front(), 0);  // embeddings on the first device
  EXPECT_EQ(r.device.back(), 1);   // head on the last
}

TEST(Planner, DenseModelCutsAtTheMiddle) {
  std::vector<Item> items;
  for (int l = 0; l < 10; ++l) items.push_back({10, l, false});
  std::vector<Device> devices{{60, false}, {60, false}};
  Result r = plan(items, devices);
  ASSERT_TRUE(r.feasible);
  check_invariants(items, devices, r);
  EXPECT_EQ(r.load[0], 50);
  EXPECT_EQ(r.load[1], 50);
}

TEST(Planner, WaterFillingRespectsSmallDevice) {
  // 200 bytes of experts on devices of 40, 200, 200: targets 40, 80, 80.
  std::vector<Item> items{{0, 0, false}};
  for (int e = 0; e < 20; ++e) items.push_back({10, 0, true});
  items.push_back({0, 1, false});
  std::vector<Device> devices{{40, false}, {200, false}, {200, false}};
  Result r = plan(items, devices);
  ASSERT_TRUE(r.feasible);
  check_invariants(items, devices, r);
  EXPECT_DOUBLE_EQ(r.target[0], 40.0);
  EXPECT_DOUBLE_EQ(r.target[1], 80.0);
  EXPECT_EQ(r.load, (std::vector<int64_t>{40, 80, 80}));
}

TEST(Planner, SpillTakesOnlyTheOverflow) {
  std::vector<Item> items{{10, 0, false}};
  for (int e = 0; e < 10; ++e) items.push_back({10, 0, true});
  items.push_back({10, 1, false});
  std::vector<Device> devices{{50, false}, {50, false}, {1000, true}};  // 120 bytes, 100 fit on GPUs
  Result r = plan(items, devices);
  ASSERT_TRUE(r.feasible) << r.message;
  check_invariants(items, devices, r);
  EXPECT_EQ(r.load[2], 20);  // two experts; the head stays on the last GPU
  EXPECT_EQ(r.load[0], 50);
  EXPECT_EQ(r.load[1], 50);
  EXPECT_EQ(r.device.back(), 1);
}

TEST(Planner, ReportsShortfallWhenTotalDoesNotFit) {
  auto items = moe_model(2, 2, 10, 10, 10, 10);  // 2*(30)+20 = 80
  std::vector<Device> devices{{30, false}, {30, false}};
  Result r = plan(items, devices);
  EXPECT_FALSE(r.feasible);
  EXPECT_EQ(r.shortfall, 20);
  EXPECT_NE(r.message.find("short by"), std::string::npos);
}

TEST(Planner, ReportsPartLargerThanAnyDevice) {
  std::vector<Item> items{{1, 0, false}, {90, 0, true}, {1, 1, false}};
  std::vector<Device> devices{{50, false}, {50, false}};
  Result r = plan(items, devices);
  EXPECT_FALSE(r.feasible);
  EXPECT_GT(r.shortfall, 0);
  EXPECT_NE(r.message.find("larger than any device"), std::string::npos);
}

TEST(Planner, RejectsMalformedInput) {
  std::vector<Item> items{{1, 0, false}};
  EXPECT_THROW(plan(items, {}), std::invalid_argument);
  EXPECT_THROW(plan(items, {{-1, false}}), std::invalid_argument);
  EXPECT_THROW(plan({{-5, 0, false}}, {{10, false}}), std::invalid_argument);
}

TEST(Planner, DeterministicAndNeverWorseThanLayerGreedy) {
  std::mt19937_64 rng(7);
  for (int trial = 0; trial < 200; ++trial) {
    const int layers = 1 + static_cast<int>(rng() % 12);
    const int experts = static_cast<int>(rng() % 9);
    std::vector<Item> items{{static_cast<int64_t>(rng() % 50), -1, false}};
    for (int l = 0; l < layers; ++l) {
      items.push_back({static_cast<int64_t>(1 + rng() % 40), l, false});
      for (int e = 0; e < experts; ++e) items.push_back({static_cast<int64_t>(1 + rng() % 30), l, true});
    }
    items.push_back({static_cast<int64_t>(rng() % 50), layers, false});
    int64_t total = 0;
    for (auto& it : items) total += it.bytes;
    const int D = 1 + static_cast<int>(rng() % 6);
    std::vector<Device> devices;
    for (int d = 0; d < D; ++d) devices.push_back({total / D + static_cast<int64_t>(rng() % (total + 1)), false});
    Result a = plan(items, devices), b = plan(items, devices), g = layer_greedy(items, devices);
    EXPECT_EQ(a.device, b.device);
    if (g.feasible) {
      ASSERT_TRUE(a.feasible) << "trial " << trial;
      EXPECT_LE(a.spread, g.spread + 1e-6) << "trial " << trial;
    }
    if (a.feasible) check_invariants(items, devices, a);
  }
}
