// A set of integers in [0, limit) with "smallest member >= x" and "largest member <= x" queries: a
// 64-ary segment tree of bitmasks. levels_[0] has one bit per integer; bit j of levels_[k + 1] says
// whether word j of levels_[k] is non-zero. Insert, erase and both queries cost O(log_64 limit) word
// operations. Used by the bin packers (best_fit_cpu.cpp: buckets of open packs by remaining capacity;
// fill_in_order_cpu.cpp: buckets of candidate items by length).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace tfp {

class CapacitySet {
 public:
  explicit CapacitySet(int64_t limit) {
    int64_t n = std::max<int64_t>(limit, 1);
    do {
      const int64_t words = (n + 63) / 64;
      levels_.emplace_back(static_cast<size_t>(words), uint64_t{0});
      n = words;
    } while (n > 1);
  }

  void insert(int64_t c) {
    for (auto& level : levels_) {
      uint64_t& word = level[static_cast<size_t>(c >> 6)];
      const bool was_empty = word == 0;
      word |= uint64_t{1} << (c & 63);
      if (!was_empty) return;
      c >>= 6;
    }
  }

  void erase(int64_t c) {
    for (auto& level : levels_) {
      uint64_t& word = level[static_cast<size_t>(c >> 6)];
      word &= ~(uint64_t{1} << (c & 63));
      if (word != 0) return;
      c >>= 6;
    }
  }

  // Smallest member >= x, or -1.
  int64_t next(int64_t x) const {
    size_t k = 0;
    for (; k < levels_.size(); ++k) {  // climb until a word holds a member >= x
      const auto& level = levels_[k];
      const int64_t word = x >> 6;
      if (word >= static_cast<int64_t>(level.size())) return -1;
      const uint64_t bits = level[static_cast<size_t>(word)] & (~uint64_t{0} << (x & 63));
      if (bits != 0) {
        x = (word << 6) | __builtin_ctzll(bits);
        break;
      }
      x = word + 1;  // first bit of the next word, one level up
    }
    if (k == levels_.size()) return -1;
    while (k > 0) {  // descend to the smallest member below the bit found
      --k;
      x = (x << 6) | __builtin_ctzll(levels_[k][static_cast<size_t>(x)]);
    }
    return x;
  }

  // Largest member <= x (x >= 0), or -1.
  int64_t prev(int64_t x) const {
    size_t k = 0;
    for (; k < levels_.size(); ++k) {  // climb until a word holds a member <= x
      const auto& level = levels_[k];
      int64_t word = x >> 6;
      uint64_t bits;
      if (word >= static_cast<int64_t>(level.size())) {  // x past the end: the whole last word
        word = static_cast<int64_t>(level.size()) - 1;
        bits = level[static_cast<size_t>(word)];
      } else {
        bits = level[static_cast<size_t>(word)] & (~uint64_t{0} >> (63 - (x & 63)));
      }
      if (bits != 0) {
        x = (word << 6) | (63 - __builtin_clzll(bits));
        break;
      }
      if (word == 0) return -1;
      x = word - 1;  // last bit of the previous word, one level up
    }
    if (k == levels_.size()) return -1;
    while (k > 0) {  // descend to the largest member below the bit found
      --k;
      x = (x << 6) | (63 - __builtin_clzll(levels_[k][static_cast<size_t>(x)]));
    }
    return x;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;
};

}  // namespace tfp
