#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <stdexcept>
#include <unordered_map>
#include <vector>

#include "core/common/flat_index.h"

namespace {

using Index = memwarden::core::FlatIndex<int32_t, -1>;

// n distinct keys whose probes all start at the same slot of `index`.
std::vector<uint64_t> keys_with_one_home(const Index& index, size_t n) {
  std::vector<uint64_t> keys;
  const size_t home = index.home_slot(0);
  for (uint64_t k = 0; keys.size() < n; ++k)
    if (index.home_slot(k) == home) keys.push_back(k);
  return keys;
}

}  // namespace

TEST(FlatIndex, ReserveGivesAPowerOfTwoAtLeastTwiceTheEntries) {
  EXPECT_EQ(Index().capacity(), 0u);
  EXPECT_EQ(Index(0).capacity(), 0u);
  EXPECT_EQ(Index(1).capacity(), 2u);
  EXPECT_EQ(Index(4).capacity(), 8u);
  EXPECT_EQ(Index(5).capacity(), 16u);
  Index index(5);
  for (uint64_t k = 0; k < 5; ++k) ASSERT_TRUE(index.insert(k * 977, static_cast<int32_t>(k)));
  EXPECT_EQ(index.capacity(), 16u);  // reserved entries never reallocate
}

TEST(FlatIndex, InsertFindTakeErase) {
  Index index;
  EXPECT_EQ(index.find(7), -1);
  EXPECT_TRUE(index.insert(7, 0));
  EXPECT_FALSE(index.insert(7, 1));  // present: unchanged
  EXPECT_EQ(index.find(7), 0);
  EXPECT_TRUE(index.insert(0, 1));  // key 0 is an ordinary key
  EXPECT_EQ(index.find(0), 1);
  EXPECT_THROW(index.insert(9, -1), std::invalid_argument);  // the empty marker
  EXPECT_EQ(index.take(0), 1);
  EXPECT_EQ(index.take(0), -1);
  EXPECT_TRUE(index.erase(7));
  EXPECT_FALSE(index.erase(7));
  EXPECT_EQ(index.find(7), -1);
  EXPECT_EQ(index.size(), 0u);

  const Index empty;
  EXPECT_EQ(empty.find(0), -1);
}

TEST(FlatIndex, GrowsAndKeepsEveryEntry) {
  Index index;
  for (uint64_t k = 0; k < 10000; ++k) ASSERT_TRUE(index.insert(k << 9, static_cast<int32_t>(k)));  // address-like keys
  EXPECT_EQ(index.size(), 10000u);
  EXPECT_GE(index.capacity(), 20000u);
  for (uint64_t k = 0; k < 10000; ++k) ASSERT_EQ(index.find(k << 9), static_cast<int32_t>(k)) << k;
  EXPECT_EQ(index.find(1), -1);
}

TEST(FlatIndex, EraseInTheMiddleOfAProbeChain) {
  Index index(8);
  const std::vector<uint64_t> keys = keys_with_one_home(index, 6);
  for (size_t i = 0; i < keys.size(); ++i) ASSERT_TRUE(index.insert(keys[i], static_cast<int32_t>(i)));
  EXPECT_TRUE(index.erase(keys[2]));  // later entries must shift back to stay reachable
  EXPECT_EQ(index.find(keys[2]), -1);
  for (size_t i = 0; i < keys.size(); ++i)
    if (i != 2) EXPECT_EQ(index.find(keys[i]), static_cast<int32_t>(i)) << i;
  EXPECT_TRUE(index.erase(keys[0]));  // the head of the chain
  EXPECT_TRUE(index.erase(keys[5]));  // its tail
  for (size_t i : {1, 3, 4}) EXPECT_EQ(index.find(keys[i]), static_cast<int32_t>(i)) << i;
  EXPECT_EQ(index.size(), 3u);
}

TEST(FlatIndex, ChainWrapsAroundTheEndOfTheTable) {
  Index index(5);  // 16 slots
  std::vector<uint64_t> last_slot_keys;
  std::vector<uint64_t> first_slot_keys;
  for (uint64_t k = 0; last_slot_keys.size() < 3 || first_slot_keys.size() < 2; ++k) {
    if (index.home_slot(k) == index.capacity() - 1 && last_slot_keys.size() < 3) last_slot_keys.push_back(k);
    if (index.home_slot(k) == 0 && first_slot_keys.size() < 2) first_slot_keys.push_back(k);
  }
  // Slots 15, 0, 1 hold the last-slot keys; the first-slot keys land in 2 and 3.
  for (uint64_t k : last_slot_keys) ASSERT_TRUE(index.insert(k, 1));
  for (uint64_t k : first_slot_keys) ASSERT_TRUE(index.insert(k, 2));
  ASSERT_EQ(index.capacity(), 16u);
  EXPECT_TRUE(index.erase(last_slot_keys[0]));  // shifts entries back across the wrap
  for (size_t i = 1; i < 3; ++i) EXPECT_EQ(index.find(last_slot_keys[i]), 1);
  for (uint64_t k : first_slot_keys) EXPECT_EQ(index.find(k), 2);
}

TEST(FlatIndex, HeavyChurnMatchesUnorderedMap) {
  // Random inserts, erases, takes and finds against a std::unordered_map model; half the
  // keys differ only in their high 32 bits (equal low bits).
  Index index(500);
  std::unordered_map<uint64_t, int32_t> model;
  std::mt19937_64 rng(12345);
  auto random_key = [&]() -> uint64_t {
    const uint64_t k = rng() % 1500;
    return rng() % 2 ? k : (k << 32) | 0x2a;
  };
  for (int op = 0; op < 300000; ++op) {
    const uint64_t key = random_key();
    switch (rng() % 4) {
      case 0: {
        const int32_t value = static_cast<int32_t>(rng() % 1000);
        ASSERT_EQ(index.insert(key, value), model.emplace(key, value).second) << "op " << op;
        break;
      }
      case 1:
        ASSERT_EQ(index.erase(key), model.erase(key) == 1) << "op " << op;
        break;
      case 2: {
        const auto it = model.find(key);
        ASSERT_EQ(index.take(key), it == model.end() ? -1 : it->second) << "op " << op;
        if (it != model.end()) model.erase(it);
        break;
      }
      default: {
        const auto it = model.find(key);
        ASSERT_EQ(index.find(key), it == model.end() ? -1 : it->second) << "op " << op;
      }
    }
    ASSERT_EQ(index.size(), model.size());
  }
  for (const auto& [key, value] : model) EXPECT_EQ(index.find(key), value);
}
