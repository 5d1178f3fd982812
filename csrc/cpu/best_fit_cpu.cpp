// Best-fit-decreasing bin packing on the CPU: global ("bfd") or inside consecutive windows
// ("window_best_fit"). The plain-Python definition it reproduces exactly is
// tfp_kernels/packing/reference.py::best_fit_decreasing_reference:
//
//   1. items by decreasing length, equal lengths by increasing index;
//   2. each item into the open pack with the smallest remaining capacity that fits it; among packs with
//      that capacity, the one whose load changed most recently; a new pack when none fits;
//   3. packs numbered by their first item in input order; items inside a pack in input order.
//
// Open packs are kept in buckets by remaining capacity, each bucket a LIFO stack (the top is the pack
// that reached this capacity last, which is rule 2's tie-break). Finding the smallest non-empty bucket
// >= length is a query on a segment tree over capacities [0, max_len]: a 64-ary tree of bitmasks
// (one bit per capacity, one bit per non-empty 64-bit word one level up; capacity_set.h), so a query or an
// update costs O(log_64 max_len) word operations. For a large max_len (above kDenseLimit, or large next to N) the
// buckets live in a std::map (O(log #distinct capacities)) instead. Either way: O(N log max_len) after an
// O(N + max_len) counting sort (global, dense) or O(N log W) sorts (windows of W items). The global dense
// path reads the lengths from the counting sort's buckets and writes its results sequentially, so the
// only random memory accesses are in the final renumbering.
//
// The op is sequential by nature; CUDA inputs are packed on a host copy by the Python wrapper.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <tuple>
#include <vector>

#include "capacity_set.h"
#include "checks.h"
#include "ops.h"

namespace tfp {
namespace {

constexpr int64_t kDenseLimit = int64_t{1} << 20;  // bucket arrays of max_len + 1 entries up to here
constexpr int32_t kNone = -1;

// Buckets of open packs by remaining capacity, for small max_len: stack_[c] is the LIFO stack of packs
// with remaining capacity c (top = back), set_ the non-empty capacities.
class DenseBuckets {
 public:
  explicit DenseBuckets(int64_t max_len) : set_(max_len + 1), stack_(static_cast<size_t>(max_len + 1)) {}

  // Pops the top pack of the smallest non-empty bucket >= length; false when there is none.
  bool pop_best(int64_t length, int32_t* pack, int64_t* capacity) {
    const int64_t c = set_.next(length);
    if (c < 0) return false;
    auto& stack = stack_[static_cast<size_t>(c)];
    *pack = stack.back();
    stack.pop_back();
    if (stack.empty()) set_.erase(c);
    *capacity = c;
    return true;
  }

  void push(int64_t c, int32_t pack) {
    auto& stack = stack_[static_cast<size_t>(c)];
    if (stack.empty()) {
      set_.insert(c);
      touched_.push_back(c);
    }
    stack.push_back(pack);
  }

  // Empties every bucket (between windows), in time proportional to the buckets used since the last clear.
  void clear() {
    for (const int64_t c : touched_) {
      auto& stack = stack_[static_cast<size_t>(c)];
      if (!stack.empty()) {
        stack.clear();
        set_.erase(c);
      }
    }
    touched_.clear();
  }

 private:
  CapacitySet set_;
  std::vector<std::vector<int32_t>> stack_;
  std::vector<int64_t> touched_;
};

// The same buckets for any max_len: an ordered map from capacity to the top of its stack, next_[pack]
// the pack below it.
class SparseBuckets {
 public:
  explicit SparseBuckets(int64_t max_packs) : next_(static_cast<size_t>(max_packs)) {}

  bool pop_best(int64_t length, int32_t* pack, int64_t* capacity) {
    const auto it = head_.lower_bound(length);
    if (it == head_.end()) return false;
    *pack = it->second;
    *capacity = it->first;
    const int32_t below = next_[static_cast<size_t>(it->second)];
    if (below == kNone) {
      head_.erase(it);
    } else {
      it->second = below;
    }
    return true;
  }

  void push(int64_t c, int32_t pack) {
    const auto [it, inserted] = head_.try_emplace(c, pack);
    if (inserted) {
      next_[static_cast<size_t>(pack)] = kNone;
    } else {
      next_[static_cast<size_t>(pack)] = it->second;
      it->second = pack;
    }
  }

  void clear() { head_.clear(); }

 private:
  std::map<int64_t, int32_t> head_;
  std::vector<int32_t> next_;
};

// Best fit of one item of the given length; returns its (raw, opening-order) pack.
template <class Buckets>
inline int32_t fit_one(int64_t length, int64_t max_len, Buckets& buckets, int32_t* num_packs) {
  int32_t pack;
  int64_t remaining;
  if (buckets.pop_best(length, &pack, &remaining)) {
    remaining -= length;
  } else {
    pack = (*num_packs)++;
    remaining = max_len - length;
  }
  if (remaining > 0) buckets.push(remaining, pack);
  return pack;
}

// Global BFD for small max_len: a stable counting sort by decreasing length gives the items in processing
// order (items[k]), and the lengths come from the buckets of that sort rather than from random reads.
int32_t pack_global_dense(const int64_t* len, int64_t n, int64_t max_len, int32_t* items, int32_t* pack_sorted) {
  std::vector<int64_t> start(static_cast<size_t>(max_len + 2), 0);  // by key = max_len - length
  for (int64_t i = 0; i < n; ++i) ++start[static_cast<size_t>(max_len - len[i] + 1)];
  for (int64_t key = 0; key <= max_len; ++key) start[static_cast<size_t>(key + 1)] += start[static_cast<size_t>(key)];
  {
    std::vector<int64_t> fill(start.begin(), start.end());
    for (int64_t i = 0; i < n; ++i) items[fill[static_cast<size_t>(max_len - len[i])]++] = static_cast<int32_t>(i);
  }
  DenseBuckets buckets(max_len);
  int32_t num_packs = 0;
  for (int64_t key = 0; key < max_len; ++key) {
    const int64_t length = max_len - key;
    const int64_t end = start[static_cast<size_t>(key + 1)];
    for (int64_t k = start[static_cast<size_t>(key)]; k < end; ++k) {
      pack_sorted[k] = fit_one(length, max_len, buckets, &num_packs);
    }
  }
  return num_packs;
}

// Items [begin, end) by decreasing length, ties by increasing index, into out[0 .. end - begin).
void sort_window(const int64_t* len, int64_t begin, int64_t end, int64_t max_len, int32_t* out) {
  const int64_t count = end - begin;
  if (max_len < (int64_t{1} << 32)) {
    // Keys (max_len - length) << 32 | local index: one integer sort, ties broken by the index bits.
    std::vector<uint64_t> keys(static_cast<size_t>(count));
    for (int64_t i = begin; i < end; ++i) {
      keys[static_cast<size_t>(i - begin)] =
          (static_cast<uint64_t>(max_len - len[i]) << 32) | static_cast<uint64_t>(i - begin);
    }
    std::sort(keys.begin(), keys.end());
    for (int64_t k = 0; k < count; ++k) {
      out[k] = static_cast<int32_t>(begin + static_cast<int64_t>(keys[static_cast<size_t>(k)] & 0xffffffffu));
    }
    return;
  }
  for (int64_t k = 0; k < count; ++k) out[k] = static_cast<int32_t>(begin + k);
  std::sort(out, out + count, [len](int32_t a, int32_t b) { return len[a] != len[b] ? len[a] > len[b] : a < b; });
}

// BFD inside consecutive windows of `window` items (one window when window >= n), any max_len.
template <class Buckets>
int32_t pack_windows(const int64_t* len, int64_t n, int64_t max_len, int64_t window, Buckets& buckets, int32_t* items,
                     int32_t* pack_sorted) {
  int32_t num_packs = 0;
  for (int64_t begin = 0; begin < n; begin += window) {
    const int64_t end = std::min(n, begin + window);
    sort_window(len, begin, end, max_len, items + begin);
    for (int64_t k = begin; k < end; ++k) pack_sorted[k] = fit_one(len[items[k]], max_len, buckets, &num_packs);
    buckets.clear();
  }
  return num_packs;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> best_fit_decreasing_cpu(const at::Tensor& lengths,
                                                                                   int64_t max_len, int64_t window) {
  TFP_CHECK_CPU(lengths);
  TFP_CHECK_DIM(lengths, 1);
  TFP_CHECK_DTYPE(lengths, at::kLong);
  TORCH_CHECK(max_len > 0, "max_len must be positive, got ", max_len);
  TORCH_CHECK(window > 0, "window must be positive, got ", window);
  const auto lens = lengths.contiguous();
  const int64_t n = lens.numel();
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "best_fit_decreasing supports < 2^31 items, got ", n);
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(len[i] > 0 && len[i] <= max_len, "lengths[", i, "] = ", len[i], " is outside [1, max_len=", max_len,
                "]");
  }
  window = std::min(window, std::max<int64_t>(n, 1));
  // Bucket arrays of max_len + 1 entries when that is small, absolutely and relative to n.
  const bool dense = max_len <= kDenseLimit && max_len <= 64 * n + 4096;

  // 1-2. processing order items[k] and the (raw, opening-order) pack of items[k]
  std::vector<int32_t> items(static_cast<size_t>(n));
  std::vector<int32_t> pack_sorted(static_cast<size_t>(n));
  int32_t num_packs;
  if (dense && window >= n) {
    num_packs = pack_global_dense(len, n, max_len, items.data(), pack_sorted.data());
  } else if (dense) {
    DenseBuckets buckets(max_len);
    num_packs = pack_windows(len, n, max_len, window, buckets, items.data(), pack_sorted.data());
  } else {
    SparseBuckets buckets(n);
    num_packs = pack_windows(len, n, max_len, window, buckets, items.data(), pack_sorted.data());
  }

  // 3. renumber the packs by their first item, then list the items pack by pack (stable counting sort)
  std::vector<int32_t> size(static_cast<size_t>(num_packs), 0);
  std::vector<int32_t> pack_of(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    ++size[static_cast<size_t>(pack_sorted[static_cast<size_t>(k)])];
    pack_of[static_cast<size_t>(items[static_cast<size_t>(k)])] = pack_sorted[static_cast<size_t>(k)];
  }
  std::vector<int32_t>().swap(pack_sorted);
  std::vector<int32_t>().swap(items);
  std::vector<int32_t> new_id(static_cast<size_t>(num_packs), kNone);
  std::vector<int32_t> start(static_cast<size_t>(num_packs) + 1, 0);  // first listed item of each pack
  int32_t next_id = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t raw = pack_of[static_cast<size_t>(i)];
    int32_t& id = new_id[static_cast<size_t>(raw)];
    if (id == kNone) {
      id = next_id++;
      start[static_cast<size_t>(id) + 1] = size[static_cast<size_t>(raw)];
    }
    pack_of[static_cast<size_t>(i)] = id;
  }
  for (int32_t p = 0; p < num_packs; ++p) start[static_cast<size_t>(p) + 1] += start[static_cast<size_t>(p)];

  auto order = at::empty({n}, lens.options());
  auto pack_id = at::empty({n}, lens.options());
  auto length = at::empty({n}, lens.options());
  auto pack_offsets = at::empty({static_cast<int64_t>(num_packs) + 1}, lens.options());
  int64_t* order_ptr = order.data_ptr<int64_t>();
  int64_t* pack_ptr = pack_id.data_ptr<int64_t>();
  int64_t* length_ptr = length.data_ptr<int64_t>();
  int64_t* offsets_ptr = pack_offsets.data_ptr<int64_t>();
  for (int32_t p = 0; p < num_packs; ++p) {  // pack ids of the listed items: runs of equal ids
    std::fill(pack_ptr + start[static_cast<size_t>(p)], pack_ptr + start[static_cast<size_t>(p) + 1], int64_t{p});
  }
  std::vector<int32_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int32_t pos = fill[static_cast<size_t>(pack_of[static_cast<size_t>(i)])]++;
    order_ptr[pos] = i;
    length_ptr[pos] = len[i];
  }
  offsets_ptr[0] = 0;
  for (int32_t p = 0; p < num_packs; ++p) {  // tokens per pack, from the listed lengths (sequential)
    int64_t tokens = 0;
    for (int32_t k = start[static_cast<size_t>(p)]; k < start[static_cast<size_t>(p) + 1]; ++k) tokens += length_ptr[k];
    offsets_ptr[p + 1] = offsets_ptr[p] + tokens;
  }
  return {order, pack_id, length, pack_offsets};
}

}  // namespace tfp
