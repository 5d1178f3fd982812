// "fill_in_order" bin packing on the CPU: next fit in input order, each pack then topped up from the
// items ahead of it. The plain-Python definition it reproduces exactly is
// tfp_kernels/packing/reference.py::fill_in_order_reference:
//
//   1. a pack opens with the first unplaced item s;
//   2. while the next unplaced item (in input order) fits the pack's room, it joins (next fit);
//   3. then, while some candidate fits, the best one joins, the candidates being the unplaced items at
//      positions [s, s + window): without rows, the longest (ties: the
//      earliest); with rows (one embedding per item), the one with the highest
//        score = mean cosine similarity to the pack's items + fill_weight * length / room
//      (ties: the earliest); with min_distance > 0, a candidate closer than min_distance to an item of
//      the pack joins only when no other candidate fits;
//   4. the pack closes when no candidate fits. Packs are numbered in opening order (= by first item);
//      items inside a pack are listed in input order.
//
// An item that joins in step 3 lies within `window` positions of the pack's first item; with window = 1
// the rule is next fit.
//
// keep_apart = K >= 1 (rows only): in step 2 an item closer than min_distance to an item of the pack is
// passed over (stays unplaced), up to K per pack, the (K + 1)-th joins anyway; in step 3 such a candidate
// never joins. A passed-over item is the first unplaced item within K packs, so it is placed then at the
// latest. The distances are against the pack's items only: O(N * pack size * D) for step 2.
//
// Length-only path: the candidates are kept in buckets by length (a FIFO queue of positions per length,
// a CapacitySet of the non-empty lengths), so "the longest candidate <= room" is a prev() query and every
// item taken is the head of its queue (steps 2-3 take the earliest of a length). O(N log_64 max_len) after
// O(N + max_len) set-up; for a large max_len (above kDenseLimit, or large next to N) the lengths are first
// replaced by their rank among the distinct lengths (a sort, O(N log N)). Each pack is written out when it
// closes (its items sorted), so the outputs are written sequentially.
//
// Rows path: every top-up step scores the fitting candidates of the window, O(window * D) per step.
// The floating-point arithmetic is spelled out so that the Python reference can repeat it bit for bit:
// float32 rows, double accumulators, dot products as four interleaved partial sums
// ((a0 + a1) + (a2 + a3)), no fused multiply-add (the build passes -ffp-contract=off).
//
// The op is sequential by nature; CUDA inputs are packed on a host copy by the Python wrapper.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "capacity_set.h"
#include "checks.h"
#include "ops.h"

namespace tfp {
namespace {

constexpr int64_t kDenseLimit = int64_t{1} << 20;  // length buckets indexed by the length up to here
constexpr int32_t kNone = -1;

// Sum over d of a[d] * b[d] in double, as four partial sums s[d % 4], combined (s0 + s1) + (s2 + s3).
// (Four independent chains: the compiler may keep them in one vector register, the sums stay the same.)
template <class A, class B>
inline double dot4(const A* a, const B* b, int64_t dim) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int64_t d = 0;
  for (; d + 4 <= dim; d += 4) {
    s0 += static_cast<double>(a[d]) * static_cast<double>(b[d]);
    s1 += static_cast<double>(a[d + 1]) * static_cast<double>(b[d + 1]);
    s2 += static_cast<double>(a[d + 2]) * static_cast<double>(b[d + 2]);
    s3 += static_cast<double>(a[d + 3]) * static_cast<double>(b[d + 3]);
  }
  if (d < dim) s0 += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  if (d + 1 < dim) s1 += static_cast<double>(a[d + 1]) * static_cast<double>(b[d + 1]);
  if (d + 2 < dim) s2 += static_cast<double>(a[d + 2]) * static_cast<double>(b[d + 2]);
  return (s0 + s1) + (s2 + s3);
}

// Sum over d of (a[d] - b[d])^2 in double, with the same partial sums.
inline double sq_dist4(const float* a, const float* b, int64_t dim) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t d = 0; d < dim; ++d) {
    const double diff = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s[d & 3] += diff * diff;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// Candidates by length: a FIFO queue of positions per length rank (head_/tail_; next_ links the positions of
// one rank in increasing order) and the set of non-empty ranks. Queued positions lie in [s, s + window), so
// next_ is a ring of a power of two >= window slots indexed by position.
class LengthBuckets {
 public:
  LengthBuckets(int64_t num_ranks, int64_t window)
      : set_(num_ranks), head_(static_cast<size_t>(num_ranks), kNone), tail_(static_cast<size_t>(num_ranks), kNone) {
    int64_t slots = 1;
    while (slots < window) slots <<= 1;
    next_.assign(static_cast<size_t>(slots), kNone);
    mask_ = slots - 1;
  }

  void push(int64_t rank, int32_t pos) {  // positions are pushed in increasing order
    next_[slot(pos)] = kNone;  // the slot's previous position (pos - slots < s) has left the queues
    int32_t& tail = tail_[static_cast<size_t>(rank)];
    if (tail == kNone) {
      head_[static_cast<size_t>(rank)] = pos;
      set_.insert(rank);
    } else {
      next_[slot(tail)] = pos;
    }
    tail = pos;
  }

  int32_t head(int64_t rank) const { return head_[static_cast<size_t>(rank)]; }

  void pop(int64_t rank) {
    int32_t& head = head_[static_cast<size_t>(rank)];
    const int32_t below = next_[slot(head)];
    if (below == kNone) {
      head = kNone;
      tail_[static_cast<size_t>(rank)] = kNone;
      set_.erase(rank);
    } else {
      head = below;
    }
  }

  int64_t largest_up_to(int64_t rank) const { return set_.prev(rank); }

 private:
  size_t slot(int32_t pos) const { return static_cast<size_t>(pos & mask_); }

  CapacitySet set_;
  std::vector<int32_t> head_, tail_, next_;
  int64_t mask_;
};

// Writes the packs as they close: their items in input order, then the pack offsets.
class PackWriter {
 public:
  PackWriter(const int64_t* len, int64_t* order, int64_t* pack_id, int64_t* length)
      : len_(len), order_(order), pack_id_(pack_id), length_(length) {
    offsets_.push_back(0);
  }

  void close(std::vector<int64_t>& members) {
    std::sort(members.begin(), members.end());
    const int64_t pack = static_cast<int64_t>(offsets_.size()) - 1;
    int64_t tokens = 0;
    for (const int64_t i : members) {
      order_[written_] = i;
      pack_id_[written_] = pack;
      length_[written_] = len_[i];
      tokens += len_[i];
      ++written_;
    }
    offsets_.push_back(offsets_.back() + tokens);
    members.clear();
  }

  const std::vector<int64_t>& offsets() const { return offsets_; }

 private:
  const int64_t* len_;
  int64_t *order_, *pack_id_, *length_;
  int64_t written_ = 0;
  std::vector<int64_t> offsets_;
};

// Length-only packing.
void pack_by_length(const int64_t* len, int64_t n, int64_t max_len, int64_t window, PackWriter& writer) {
  // rank of each length: the length itself (dense) or its index among the sorted distinct lengths
  const bool dense = max_len <= kDenseLimit && max_len <= 64 * n + 4096;
  std::vector<int64_t> distinct;
  std::vector<int32_t> rank_of;
  if (!dense) {
    distinct.assign(len, len + n);
    std::sort(distinct.begin(), distinct.end());
    distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
    rank_of.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {
      rank_of[static_cast<size_t>(i)] =
          static_cast<int32_t>(std::lower_bound(distinct.begin(), distinct.end(), len[i]) - distinct.begin());
    }
  }
  auto rank = [&](int64_t i) -> int64_t { return dense ? len[i] : rank_of[static_cast<size_t>(i)]; };
  // largest rank whose length is <= room (room >= 1), or -1
  auto rank_bound = [&](int64_t room) -> int64_t {
    if (dense) return room;
    return static_cast<int64_t>(std::upper_bound(distinct.begin(), distinct.end(), room) - distinct.begin()) - 1;
  };
  LengthBuckets buckets(dense ? max_len + 1 : static_cast<int64_t>(distinct.size()), window);
  std::vector<uint8_t> placed(static_cast<size_t>(n), 0);
  std::vector<int64_t> members;
  int64_t added = 0;  // items [0, added) have entered the buckets (the unplaced ones)
  int64_t s = 0;
  while (s < n) {
    const int64_t end = std::min(n, s + window);  // candidates: unplaced items in [s, end)
    for (; added < end; ++added) {
      if (!placed[static_cast<size_t>(added)]) buckets.push(rank(added), static_cast<int32_t>(added));
    }
    // the earliest unplaced item heads its queue (when it has entered the buckets)
    auto take_earliest = [&](int64_t i) {
      if (i < added) buckets.pop(rank(i));
      placed[static_cast<size_t>(i)] = 1;
      members.push_back(i);
    };
    take_earliest(s);
    int64_t room = max_len - len[s];
    int64_t cursor = s + 1;
    while (room > 0) {  // 2. next fit
      while (cursor < n && placed[static_cast<size_t>(cursor)]) ++cursor;
      if (cursor == n || len[cursor] > room) break;
      take_earliest(cursor);
      room -= len[cursor];
      ++cursor;
    }
    while (room > 0) {  // 3. top up with the longest candidate that fits, the earliest of that length
      const int64_t bound = rank_bound(room);
      if (bound < 0) break;
      const int64_t r = buckets.largest_up_to(bound);
      if (r < 0) break;
      const int32_t i = buckets.head(r);
      buckets.pop(r);
      placed[static_cast<size_t>(i)] = 1;
      members.push_back(i);
      room -= len[i];
    }
    writer.close(members);
    while (s < n && placed[static_cast<size_t>(s)]) ++s;
  }
}

// Packing with rows (N, dim) float32: the similarity-aware top-up.
void pack_by_score(const int64_t* len, int64_t n, int64_t max_len, int64_t window, const float* rows, int64_t dim,
                   double fill_weight, double min_distance, bool cosine, int64_t keep_apart, PackWriter& writer) {
  std::vector<double> norm(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) norm[static_cast<size_t>(i)] = std::sqrt(dot4(rows + i * dim, rows + i * dim, dim));
  std::vector<uint8_t> placed(static_cast<size_t>(n), 0);
  std::vector<int32_t> passed_over(static_cast<size_t>(n), kNone);  // the pack an item is known too close to
  std::vector<double> unit_sum(static_cast<size_t>(dim));           // sum of the pack's rows / their norms
  std::vector<int64_t> members;
  const bool exclude = min_distance > 0.0;
  int32_t pack = -1;
  int64_t s = 0;
  while (s < n) {
    const int64_t end = std::min(n, s + window);
    ++pack;
    std::fill(unit_sum.begin(), unit_sum.end(), 0.0);
    int64_t room = max_len;
    auto take = [&](int64_t i) {
      placed[static_cast<size_t>(i)] = 1;
      room -= len[i];
      members.push_back(i);
      const float* x = rows + i * dim;
      const double nx = norm[static_cast<size_t>(i)];
      for (int64_t d = 0; d < dim; ++d) unit_sum[static_cast<size_t>(d)] += static_cast<double>(x[d]) / nx;
    };
    auto too_close = [&](int64_t q) {
      const float* x = rows + q * dim;
      for (const int64_t m : members) {
        const float* y = rows + m * dim;
        const double distance =
            cosine ? 1.0 - dot4(x, y, dim) / norm[static_cast<size_t>(q)] / norm[static_cast<size_t>(m)]
                   : std::sqrt(sq_dist4(x, y, dim));
        if (distance < min_distance) return true;
      }
      return false;
    };
    take(s);
    int64_t cursor = s + 1;
    int64_t held = 0;  // items this pack's next fit passed over (keep_apart)
    while (room > 0) {  // 2. next fit
      while (cursor < n && placed[static_cast<size_t>(cursor)]) ++cursor;
      if (cursor == n || len[cursor] > room) break;
      if (exclude && held < keep_apart && too_close(cursor)) {
        passed_over[static_cast<size_t>(cursor)] = pack;  // too close for the rest of this pack too
        ++held;
        ++cursor;
        continue;
      }
      take(cursor);
      ++cursor;
    }
    while (room > 0) {  // 3. top up with the best-scoring candidate that fits, too-close ones last
      int64_t best = -1, best_close = -1;
      double best_score = 0.0, best_close_score = 0.0;
      const double count = static_cast<double>(members.size());
      for (int64_t q = s + 1; q < end; ++q) {
        if (placed[static_cast<size_t>(q)] || len[q] > room) continue;
        const double similarity = dot4(rows + q * dim, unit_sum.data(), dim) / norm[static_cast<size_t>(q)] / count;
        const double score =
            similarity + fill_weight * (static_cast<double>(len[q]) / static_cast<double>(room));
        if (best >= 0 && !(score > best_score)) continue;
        // too close stays too close for this pack (its items only grow): checked once per pack
        bool close = exclude && passed_over[static_cast<size_t>(q)] == pack;
        if (exclude && !close && too_close(q)) {
          passed_over[static_cast<size_t>(q)] = pack;
          close = true;
        }
        if (!close) {
          best = q;
          best_score = score;
        } else if (best_close < 0 || score > best_close_score) {
          best_close = q;
          best_close_score = score;
        }
      }
      if (best < 0 && keep_apart == 0) best = best_close;  // only too-close candidates fit
      if (best < 0) break;
      take(best);
    }
    writer.close(members);
    while (s < n && placed[static_cast<size_t>(s)]) ++s;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fill_in_order_cpu(
    const at::Tensor& lengths, int64_t max_len, int64_t window, const std::optional<at::Tensor>& rows,
    double fill_weight, double min_distance, bool cosine, int64_t keep_apart) {
  TFP_CHECK_CPU(lengths);
  TFP_CHECK_DIM(lengths, 1);
  TFP_CHECK_DTYPE(lengths, at::kLong);
  TORCH_CHECK(max_len > 0, "max_len must be positive, got ", max_len);
  TORCH_CHECK(window > 0, "window must be positive, got ", window);
  const auto lens = lengths.contiguous();
  const int64_t n = lens.numel();
  TORCH_CHECK(n < std::numeric_limits<int32_t>::max(), "fill_in_order supports < 2^31 items, got ", n);
  const int64_t* len = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(len[i] > 0 && len[i] <= max_len, "lengths[", i, "] = ", len[i], " is outside [1, max_len=", max_len,
                "]");
  }
  TORCH_CHECK(std::isfinite(fill_weight), "fill_weight must be finite, got ", fill_weight);
  TORCH_CHECK(std::isfinite(min_distance), "min_distance must be finite, got ", min_distance);
  TORCH_CHECK(keep_apart >= 0, "keep_apart must be >= 0, got ", keep_apart);
  TORCH_CHECK(keep_apart == 0 || rows.has_value(), "keep_apart needs rows (the distances are between them)");
  window = std::min(window, std::max<int64_t>(n, 1));

  auto order = at::empty({n}, lens.options());
  auto pack_id = at::empty({n}, lens.options());
  auto length = at::empty({n}, lens.options());
  PackWriter writer(len, order.data_ptr<int64_t>(), pack_id.data_ptr<int64_t>(), length.data_ptr<int64_t>());
  if (rows.has_value()) {
    const at::Tensor& r = *rows;
    TFP_CHECK_CPU(r);
    TFP_CHECK_DIM(r, 2);
    TFP_CHECK_DTYPE(r, at::kFloat);
    TORCH_CHECK(r.size(0) == n, "rows must have one row per item (", n, "), got shape ", r.sizes());
    const auto rows_c = r.contiguous();
    const int64_t dim = rows_c.size(1);
    const float* data = rows_c.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      const double sq = dot4(data + i * dim, data + i * dim, dim);
      TORCH_CHECK(std::isfinite(sq) && sq > 0.0, "rows[", i, "] must be finite and non-zero");
    }
    pack_by_score(len, n, max_len, window, data, dim, fill_weight, min_distance, cosine, keep_apart, writer);
  } else {
    pack_by_length(len, n, max_len, window, writer);
  }
  const auto& offsets = writer.offsets();
  auto pack_offsets = at::empty({static_cast<int64_t>(offsets.size())}, lens.options());
  std::copy(offsets.begin(), offsets.end(), pack_offsets.data_ptr<int64_t>());
  return {order, pack_id, length, pack_offsets};
}

}  // namespace tfp
