// The TFP walk over band lists, on the CPU (docs/design.md, 'What the walk proves from a list').
//
// At each step the walk takes, among the unvisited nodes, the first node in the order (D[last, j], j)
// that lies at distance >= t from each of the last `window` path nodes. It looks for that node in the
// band list of `last` (the K nearest nodes whose approximate squared distance is >= the band's lower
// bound), settling every decision with exact distances computed here in double precision from the
// embeddings. Where the list cannot prove its answer, it needs an exact fallback scan:
//   - no unvisited valid node in the list, or
//   - the best one is not certainly closer than every node outside the list
//     (exact s2 >= band_limit2[last]), or
//   - the rejection cap could fire (num_close[last] + K >= max_rejections while more than
//     max_rejections candidates remain).
// With `scan_rows` (float16 copies of the prepared rows, see FallbackScan) given, the scan runs here and
// the walk completes; without them the op returns the step that needs the scan and the caller runs it.
// Long lists (optional): a list row r with long_row[r] >= 0 reads its list from row long_row[r] of
// long_index / long_s2 (L, K_long) instead of the band tables, with the error bound long_slack[long_row[r]]
// of its s2 (band_limit2[r] is then that list's limit).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace tfp {
namespace {

// Squared L2 distance of two rows in double: of the unit rows pa / na and pb / nb for cosine. Eight
// independent partial sums (lanes), added at the end in lane order: the same roundings whatever the vector
// width (the extension is built with -ffp-contract=off, so no fused multiply-adds either), so a path does
// not depend on the CPU it was computed on. Compiled for AVX-512, AVX2 and baseline x86-64, picked by CPU
// feature at load: the walk computes it for every entry it examines (at the baseline's two doubles per
// instruction: 6.5 us per step at N = 100,000, K = 64, against 5.7 with the clones); for cosine the walk's
// list loop divides each row once per step instead (UnitRows).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define TFP_WALK_DISPATCH __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TFP_WALK_DISPATCH
#endif
#if defined(__GNUC__) || defined(__clang__)
#define TFP_WALK_INLINE __attribute__((always_inline)) inline
#else
#define TFP_WALK_INLINE inline
#endif

template <typename scalar_t>
TFP_WALK_INLINE double row_s2_lanes(const scalar_t* pa, const scalar_t* pb, int64_t dim, double na, double nb,
                                    bool cosine) {
  constexpr int kLanes = 8;
  double acc[kLanes] = {0.0};
  int64_t k = 0;
  if (cosine) {
    for (; k + kLanes <= dim; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const double diff = static_cast<double>(pa[k + j]) / na - static_cast<double>(pb[k + j]) / nb;
        acc[j] += diff * diff;
      }
    }
    for (; k < dim; ++k) {
      const double diff = static_cast<double>(pa[k]) / na - static_cast<double>(pb[k]) / nb;
      acc[0] += diff * diff;
    }
  } else {
    for (; k + kLanes <= dim; k += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const double diff = static_cast<double>(pa[k + j]) - static_cast<double>(pb[k + j]);
        acc[j] += diff * diff;
      }
    }
    for (; k < dim; ++k) {
      const double diff = static_cast<double>(pa[k]) - static_cast<double>(pb[k]);
      acc[0] += diff * diff;
    }
  }
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

TFP_WALK_DISPATCH double row_s2(const float* pa, const float* pb, int64_t dim, double na, double nb, bool cosine) {
  return row_s2_lanes(pa, pb, dim, na, nb, cosine);
}

TFP_WALK_DISPATCH double row_s2(const double* pa, const double* pb, int64_t dim, double na, double nb,
                                bool cosine) {
  return row_s2_lanes(pa, pb, dim, na, nb, cosine);
}

template <typename scalar_t>
struct ExactDistance {
  const scalar_t* x;
  const double* norms;  // row norms for cosine, nullptr for l2
  int64_t dim;
  bool cosine;

  // Ask the caches for row a (one prefetch per 64-byte line).
  void prefetch(int64_t a) const {
    const char* row = reinterpret_cast<const char*>(x + a * dim);
    const int64_t bytes = dim * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(row + off, 0, 1);
  }

  // The prepared row a (unit row for cosine) rounded to float32, into out (dim floats).
  void prepared_row(int64_t a, float* out) const {
    const scalar_t* pa = x + a * dim;
    for (int64_t k = 0; k < dim; ++k) {
      out[k] = static_cast<float>(cosine ? static_cast<double>(pa[k]) / norms[a] : static_cast<double>(pa[k]));
    }
  }

  // Squared L2 distance of the prepared rows (unit rows for cosine), in double (row_s2).
  double s2(int64_t a, int64_t b) const {
    return cosine ? row_s2(x + a * dim, x + b * dim, dim, norms[a], norms[b], true)
                  : row_s2(x + a * dim, x + b * dim, dim, 1.0, 1.0, false);
  }

  // The metric distance from a squared distance, computed as the reference does.
  double metric(double s2_value) const {
    const double l2 = std::sqrt(s2_value);
    return cosine ? 0.5 * l2 * l2 : l2;
  }
};

// Cosine: the unit rows (x / ||x||, in double) of the rows a step compares, each divided once per step
// instead of in every distance (row_s2 divides both rows per element: the divisions took half the cosine
// walk's time: its list loop 0.48 -> 0.25 s at N = 50,000, D = 768 on the 2-core CPU, the same path).
// The distances of cached rows are row_s2's bit for bit: the same quotients, differences and lanes. Slots hold
// the window's path positions (position q in slot q mod slots) and the entry being examined.
template <typename scalar_t>
class UnitRows {
 public:
  static constexpr int64_t kMaxSlots = 65;  // windows up to 64 nodes (wider ones divide in row_s2)

  UnitRows(const ExactDistance<scalar_t>& dist, int64_t window)
      : dist_(dist), slots_(dist.cosine && window + 1 <= kMaxSlots ? window + 1 : 0) {
    if (slots_ > 0) {
      rows_.resize(static_cast<size_t>((slots_ + 1) * dist.dim));
      node_.assign(static_cast<size_t>(slots_), -1);
    }
  }
  bool enabled() const { return slots_ > 0; }
  // The unit row of `node`, the path's node at position q.
  const double* at_position(int64_t q, int64_t node) {
    const int64_t slot = q % slots_;
    double* row = rows_.data() + slot * dist_.dim;
    if (node_[slot] != node) {
      fill(node, row);
      node_[slot] = node;
    }
    return row;
  }
  // The unit row of an entry (the slot after the window's).
  const double* entry(int64_t node) {
    double* row = rows_.data() + slots_ * dist_.dim;
    fill(node, row);
    return row;
  }
  // Squared distance of two unit rows: row_s2 of the prepared rows.
  double s2(const double* a, const double* b) const { return row_s2(a, b, dist_.dim, 1.0, 1.0, false); }

 private:
  void fill(int64_t node, double* out) const {
    const scalar_t* row = dist_.x + node * dist_.dim;
    const double norm = dist_.norms[node];
    for (int64_t k = 0; k < dist_.dim; ++k) out[k] = static_cast<double>(row[k]) / norm;
  }

  const ExactDistance<scalar_t>& dist_;
  const int64_t slots_;
  std::vector<double> rows_;
  std::vector<int64_t> node_;
};

// Exact-duplicate groups: band lists hold group ids; a group stands for its next unvisited member.
struct Groups {
  const int32_t* group_of = nullptr;     // (N,) node -> group; nullptr: no grouping (lists hold nodes)
  const int64_t* offsets = nullptr;      // (U + 1,)
  const int64_t* members = nullptr;      // (N,) members of each group, increasing
  int64_t* next = nullptr;               // (U,) position of the first possibly-unvisited member

  int64_t list_row(int64_t node) const { return group_of ? group_of[node] : node; }

  // A node whose row stands for list row `row` (all members of a group have the same row).
  int64_t representative(int64_t row) const { return group_of ? members[offsets[row]] : row; }

  // The node an entry stands for: itself, or its group's first unvisited member (-1 when none is left).
  int64_t resolve(int64_t entry, const bool* seen) const {
    if (!group_of) return seen[entry] ? -1 : entry;
    int64_t pos = next[entry];
    const int64_t end = offsets[entry + 1];
    while (pos < end && seen[members[pos]]) ++pos;
    next[entry] = pos;
    return pos < end ? members[pos] : -1;
  }
};

// The "spread" policy's urgent groups (see the op's comment in tfp_kernels.cpp): groups of two or more
// near-duplicates (a partition the caller made), numbered by decreasing size; their unvisited members are counted
// from `seen` when made, and taken() keeps the counts. A group with m unvisited members among u unvisited nodes
// would need (m - 1) (window + 1) + 1 positions to keep its members apart were they all closer than t to each
// other: from m (window + 1) >= u on it is urgent, and pick() takes its lowest unvisited member as soon as that
// one is valid.
class UrgentGroups {
 public:
  UrgentGroups(const int32_t* group_of, const int64_t* offsets, const int64_t* members, int64_t num_groups,
               const bool* seen)
      : group_of_(group_of), offsets_(offsets), members_(members), remaining_(num_groups), next_(num_groups) {
    for (int64_t g = 0; g < num_groups; ++g) {
      next_[g] = offsets[g];
      for (int64_t i = offsets[g]; i < offsets[g + 1]; ++i) remaining_[g] += !seen[members[i]];
    }
  }

  // Call after marking `node` visited.
  void taken(int64_t node) {
    const int32_t g = group_of_[node];
    if (g >= 0) --remaining_[g];
  }

  // The member to take at `step` (path[:step] set, n - step nodes unvisited), or -1 when no urgent group has a
  // valid member: of the urgent groups with a valid member, the one with the most unvisited members, ties by
  // (D[last, member], member); the member is the group's lowest unvisited node.
  template <typename scalar_t>
  int64_t pick(const int64_t* path, int64_t step, int64_t n, int64_t window, double threshold,
               const ExactDistance<scalar_t>& dist, const bool* seen) {
    const int64_t unvisited = n - step, period = window + 1;
    const int64_t need = unvisited / period + (unvisited % period != 0);  // urgent: m >= ceil(u / (window + 1))
    const int64_t groups = static_cast<int64_t>(remaining_.size());
    const int64_t last = path[step - 1];
    const int64_t win_begin = std::max<int64_t>(0, step - window);
    int64_t best = -1, best_count = 0;
    double best_d = std::numeric_limits<double>::infinity();
    // (groups by decreasing size: none past the first smaller than `need` can be urgent)
    for (int64_t g = 0; g < groups && offsets_[g + 1] - offsets_[g] >= need; ++g) {
      const int64_t m = remaining_[g];
      if (m < 2 || m < need || m < best_count) continue;
      int64_t pos = next_[g];
      while (seen[members_[pos]]) ++pos;  // (m >= 1 members are unvisited)
      next_[g] = pos;
      const int64_t c = members_[pos];
      const double d = dist.metric(dist.s2(last, c));
      if (d < threshold || (m == best_count && (d > best_d || (d == best_d && c > best)))) continue;
      bool valid = true;
      for (int64_t q = win_begin; q < step - 1 && valid; ++q) {
        valid = dist.metric(dist.s2(c, path[q])) >= threshold;
      }
      if (!valid) continue;
      best = c;
      best_count = m;
      best_d = d;
    }
    return best;
  }

 private:
  const int32_t* group_of_;  // (N,) group, -1 for a node without duplicates
  const int64_t* offsets_;   // (G + 1,)
  const int64_t* members_;   // members of each group, increasing
  std::vector<int64_t> remaining_;  // unvisited members per group
  std::vector<int64_t> next_;       // position of the first possibly-unvisited member
};

// Dot products of one float16 row (the scan's copy of a prepared row, scaled by a power of two) with up to
// kQueryBlock float32 query rows, accumulated in float32, in one read of the row. The pass over the
// unvisited rows is memory-bound (measured on this 2-core machine: 16 GB/s over rows in memory order,
// 10 GB/s in random order, hence FallbackScan's row order), so its rows are read as float16: half the bytes
// of float32, at an error bound ~6x float32's (see tfp_kernels/order/host_scan.py: half_scan_slack), which the
// exact settle absorbs. Versions for AVX-512 and AVX2 (both with F16C and FMA) and a portable one, picked
// once by CPU feature; the bound holds for any summation order and for fused multiply-adds.
constexpr int64_t kQueryBlock = 4;
using RowDotsFn = void (*)(const uint16_t* x, const float* const* q, int64_t dim, float* out);

inline float half_to_float(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }

void row_dots_portable(const uint16_t* x, const float* const* q, int64_t dim, float* out) {
  constexpr int kL = 8;
  float acc[kQueryBlock][kL] = {};
  int64_t k = 0;
  for (; k + kL <= dim; k += kL) {
    for (int l = 0; l < kL; ++l) {
      const float v = half_to_float(x[k + l]);
      for (int j = 0; j < kQueryBlock; ++j) acc[j][l] += v * q[j][k + l];
    }
  }
  for (; k < dim; ++k) {
    const float v = half_to_float(x[k]);
    for (int j = 0; j < kQueryBlock; ++j) acc[j][0] += v * q[j][k];
  }
  for (int j = 0; j < kQueryBlock; ++j) {
    float t = 0.0f;
    for (int l = 0; l < kL; ++l) t += acc[j][l];
    out[j] = t;
  }
}

// The vector versions' last (dim mod width) columns, added to their lane sums.
inline void finish_row_dots(const uint16_t* x, const float* const* q, int64_t k, int64_t dim,
                            const float* sums, float* out) {
  for (int j = 0; j < kQueryBlock; ++j) out[j] = sums[j];
  for (; k < dim; ++k) {
    const float v = half_to_float(x[k]);
    for (int j = 0; j < kQueryBlock; ++j) out[j] += v * q[j][k];
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TFP_X86_HALF_KERNELS 1
__attribute__((target("avx512f,avx2,f16c,fma"))) void row_dots_avx512(const uint16_t* x, const float* const* q,
                                                                        int64_t dim, float* out) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 16 <= dim; k += 16) {
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k)));
    a0 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[0] + k), a0);
    a1 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[1] + k), a1);
    a2 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[2] + k), a2);
    a3 = _mm512_fmadd_ps(v, _mm512_loadu_ps(q[3] + k), a3);
  }
  const float sums[kQueryBlock] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                   _mm512_reduce_add_ps(a3)};
  finish_row_dots(x, q, k, dim, sums, out);
}

__attribute__((target("avx2,f16c,fma"))) float hsum256(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

__attribute__((target("avx2,f16c,fma"))) void row_dots_avx2(const uint16_t* x, const float* const* q, int64_t dim,
                                                             float* out) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 8 <= dim; k += 8) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k)));
    a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q[0] + k), a0);
    a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q[1] + k), a1);
    a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q[2] + k), a2);
    a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(q[3] + k), a3);
  }
  const float sums[kQueryBlock] = {hsum256(a0), hsum256(a1), hsum256(a2), hsum256(a3)};
  finish_row_dots(x, q, k, dim, sums, out);
}
#endif

// The best version this CPU runs; the environment variable TFP_KERNELS_SCAN_ISA ("avx512", "avx2" or
// "portable") caps the choice, so that tests can compare every version on one machine.
RowDotsFn pick_row_dots() {
  const char* cap = std::getenv("TFP_KERNELS_SCAN_ISA");
  const std::string isa = cap ? cap : "avx512";
  TORCH_CHECK(isa == "avx512" || isa == "avx2" || isa == "portable",
              "TFP_KERNELS_SCAN_ISA must be avx512, avx2 or portable, got ", isa);
#ifdef TFP_X86_HALF_KERNELS
  __builtin_cpu_init();
  const bool f16c_fma = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  if (isa == "avx512" && f16c_fma && __builtin_cpu_supports("avx512f")) return row_dots_avx512;
  if (isa != "portable" && f16c_fma && __builtin_cpu_supports("avx2")) return row_dots_avx2;
#endif
  return row_dots_portable;
}

// Exact scan of the unvisited nodes for the rule's pick after `last`. One pass of products over the
// float16 copies of the unvisited rows against `last` and the other window nodes (row_dots, each row read
// once, in place) gives every row approximate squared distances within the error bound `slack` of the
// exact ones; those bounds leave only a few rows whose exact (double-precision) distances can change the
// pick, and only those are computed exactly.
//
// (It replaced a scan that took candidates in the order of a lower bound from 64-dimensional projections
// and computed exact distances in growing batches: on isotropic clusters in 768 dimensions the projections
// bounded nothing, and every scan computed every unvisited row exactly, 1.1 us per row on 2 cores.)
template <typename scalar_t>
class FallbackScan {
 public:
  // rows16: (N, D) float16 prepared rows (unit rows for cosine) divided by scale (N,) float64 (powers of
  // two); sq_norms: (N,) float64 squared norms of the prepared rows; slack: (N,) bounds of
  // |s2_pass - s2_exact| for every pair of each node. With groups, the scan runs over the groups that still
  // have an unvisited member: one row per group, standing for its next unvisited member (the one the rule
  // takes among equals).
  // farthest_if_forced: a scan that finds no valid node takes the node farthest from the window (the "spread"
  // policy) instead of c_0.
  FallbackScan(const ExactDistance<scalar_t>& dist, const at::Tensor& rows16, const double* scale,
               const double* sq_norms, const double* slack, const bool* seen, const Groups& groups, int64_t num_rows,
               double t2, bool farthest_if_forced)
      : dist_(dist), rows16_(reinterpret_cast<const uint16_t*>(rows16.data_ptr<at::Half>())), dim_(rows16.size(1)),
        scale_(scale), sq_norms_(sq_norms), slack_(slack), groups_(groups), seen_(seen), t2_(t2),
        farthest_(farthest_if_forced), row_dots_(pick_row_dots()), alive_(num_rows, 0) {
    for (int64_t i = 0; i < num_rows; ++i) {
      if (groups_.resolve(i, seen) >= 0) {
        alive_[i] = 1;
        order_.push_back(i);
      }
    }
    num_alive_ = static_cast<int64_t>(order_.size());
    if (groups_.group_of) {  // rows in memory order, so that the pass streams through them
      std::sort(order_.begin(), order_.end(),
                [&](int64_t a, int64_t b) { return groups_.representative(a) < groups_.representative(b); });
    }
  }

  // Call after marking `node` visited.
  void remove(int64_t node) {
    const int64_t row = groups_.list_row(node);
    if (!alive_[row] || groups_.resolve(row, seen_) >= 0) return;  // the group still has members
    alive_[row] = 0;
    --num_alive_;
  }

  int64_t pick(const int64_t* path, int64_t step, int64_t window, double threshold, int64_t max_rejections) {
    if (2 * num_alive_ < static_cast<int64_t>(order_.size())) {  // drop the visited rows from the pass, in order
      order_.erase(std::remove_if(order_.begin(), order_.end(), [&](int64_t row) { return !alive_[row]; }),
                   order_.end());
    }
    return pick_over(order_, true, std::numeric_limits<double>::infinity(), path, step, window, threshold,
                     max_rejections);
  }

  // The same pick with the pass over `rows` only (list rows in increasing order, among them every unvisited
  // node that may precede the pick), given that every node outside them lies at an exact squared distance
  // >= limit2 from `last`: the pick when it lies nearer than limit2 (no node outside can then precede it),
  // else -1 (the caller runs the full pick). With the cap, `rows` = the close set and the band list of `last`.
  int64_t pick_among(const std::vector<int64_t>& rows, double limit2, const int64_t* path, int64_t step,
                     int64_t window, double threshold, int64_t max_rejections) {
    return pick_over(rows, false, limit2, path, step, window, threshold, max_rejections);
  }

 private:
  // `whole`: the pass holds every unvisited row (limit2 +inf); else a pick at or past limit2 gives -1.
  int64_t pick_over(const std::vector<int64_t>& pass, bool whole, double limit2, const int64_t* path, int64_t step,
                    int64_t window, double threshold, int64_t max_rejections) {
    const int64_t last = path[step - 1];
    const int64_t win_begin = std::max<int64_t>(0, step - window);
    const int64_t n_u = num_alive_;
    // with groups the cap is never used (the caller does not group then), so counts of rows are counts of nodes
    const bool capped = max_rejections >= 0 && n_u > max_rejections;
    if (farthest_) {
      approximate<true>(pass, path, last, win_begin, step);
    } else {
      approximate<false>(pass, path, last, win_begin, step);
    }
    const int64_t rows = static_cast<int64_t>(pass.size());
    const double sl = slack_[last];
    // a relative margin on every comparison of squared distances: exact values proven apart by it also
    // differ after the square root of the metric (so that the (distance, index) order is certain)
    auto margin = [](double value) { return 1e-9 * std::abs(value) + 1e-300; };

    // 1. the first valid node in the order (distance, index): exactly no farther than the nearest surely
    //    valid row, so only the rows that may be valid and lie within twice the bound of it are candidates
    double best_sure = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < rows; ++i) {
      if (status_[i] == kSurelyValid) best_sure = std::min(best_sure, s2_last_[i]);
    }
    const double limit = best_sure + 2.0 * sl + margin(best_sure);  // +inf without a surely valid row
    cand_.clear();
    for (int64_t i = 0; i < rows; ++i) {
      if (status_[i] != kInvalid && s2_last_[i] <= limit) cand_.push_back(i);
    }
    exact_.resize(cand_.size());
    at::parallel_for(0, static_cast<int64_t>(cand_.size()), 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t node = node_[cand_[c]];
        const double c_s2 = dist_.s2(last, node);
        const double c_d = dist_.metric(c_s2);
        bool valid = c_d >= threshold;
        for (int64_t q = win_begin; q < step - 1 && valid; ++q) {
          valid = dist_.metric(dist_.s2(node, path[q])) >= threshold;
        }
        exact_[c] = {{valid ? c_d : std::numeric_limits<double>::infinity(), node}, c_s2};
      }
    });
    int64_t best = -1;
    double best_d = std::numeric_limits<double>::infinity(), best_s2 = best_d;
    for (const auto& e : exact_) {
      if (std::isfinite(e.first.first) && (best < 0 || e.first < std::make_pair(best_d, best))) {
        best = e.first.second;
        best_d = e.first.first;
        best_s2 = e.second;
      }
    }
    if (best >= 0 && best_s2 >= limit2) return -1;  // a node outside the pass may precede it
    if (best >= 0 && !capped) return best;
    if (best < 0 && farthest_ && whole && !capped) return farthest_over(pass, path, step, window);
    if (best >= 0) {
      // 2. with the cap: `best` is the pick if fewer than M nodes precede it (rows surely nearer count
      //    without exact distances, rows surely farther are skipped)
      const double m = margin(best_s2);
      int64_t ahead = 0;
      for (int64_t i = 0; i < rows; ++i) {
        const double a = s2_last_[i];
        if (node_[i] < 0 || node_[i] == best || a - sl - m > best_s2) continue;
        if (a + sl + m < best_s2) {
          ++ahead;
        } else {
          const double d = dist_.metric(dist_.s2(last, node_[i]));
          ahead += std::make_pair(d, node_[i]) < std::make_pair(best_d, best);
        }
      }
      if (ahead < max_rejections) return best;
    }
    // 3. no valid node: c_0 (without the cap), or c_M, the node of rank M in the order (distance, index),
    //    when the first M nodes are all invalid
    const int64_t rank = capped ? max_rejections : 0;
    values_.clear();
    for (int64_t i = 0; i < rows; ++i) {
      if (node_[i] >= 0) values_.push_back(s2_last_[i]);
    }
    if (!whole && rank >= static_cast<int64_t>(values_.size())) return -1;
    TORCH_CHECK(rank < static_cast<int64_t>(values_.size()), "tfp_walk: internal error: no unvisited node to scan");
    std::nth_element(values_.begin(), values_.begin() + rank, values_.end());
    const double v = values_[rank];
    // the rank-M node has its approximate value within 2 bounds of v; rows more than 4 bounds below v precede
    // every such node, rows more than 4 bounds above follow them: only the rows between need exact values
    const double lo = v - 4.0 * sl - 4.0 * margin(v), hi = v + 4.0 * sl + 4.0 * margin(v);
    int64_t before = 0;
    exact_.clear();
    for (int64_t i = 0; i < rows; ++i) {
      if (node_[i] < 0) continue;
      const double a = s2_last_[i];
      if (a < lo) {
        ++before;
      } else if (a <= hi) {
        exact_.push_back({{0.0, node_[i]}, 0.0});
      }
    }
    at::parallel_for(0, static_cast<int64_t>(exact_.size()), 16, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) {
        exact_[e].first.first = dist_.metric(dist_.s2(last, exact_[e].first.second));
      }
    });
    const int64_t within = rank - before;
    TORCH_CHECK(within >= 0 && within < static_cast<int64_t>(exact_.size()),
                "tfp_walk: internal error: the scan's error bound does not hold (rank ", rank, ", ", before,
                " rows before the window, ", exact_.size(), " in it)");
    std::nth_element(exact_.begin(), exact_.begin() + within, exact_.end());
    const int64_t node = exact_[within].first.second;
    return whole || dist_.s2(last, node) < limit2 ? node : -1;
  }

  // The "spread" policy's forced pick: the unvisited node whose exact distance to its nearest window node is
  // largest (ties: lower index), from the pass's approximate minima (min_s2_, within the window nodes' largest
  // bound of the exact ones): only the rows that can reach the largest lower bound get exact distances.
  int64_t farthest_over(const std::vector<int64_t>& pass, const int64_t* path, int64_t step, int64_t window) {
    const int64_t win_begin = std::max<int64_t>(0, step - window);
    double bound = 0.0;
    for (const int64_t q : query_) bound = std::max(bound, slack_[q]);
    const int64_t rows = static_cast<int64_t>(pass.size());
    auto reach = [&](double value) { return bound + 1e-9 * std::abs(value) + 1e-300; };
    double floor = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < rows; ++i) {
      if (node_[i] >= 0) floor = std::max(floor, min_s2_[i] - reach(min_s2_[i]));
    }
    cand_.clear();
    for (int64_t i = 0; i < rows; ++i) {
      if (node_[i] >= 0 && min_s2_[i] + reach(min_s2_[i]) >= floor) cand_.push_back(i);
    }
    exact_.resize(cand_.size());
    at::parallel_for(0, static_cast<int64_t>(cand_.size()), 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t node = node_[cand_[c]];
        double nearest = std::numeric_limits<double>::infinity();
        for (int64_t q = win_begin; q < step; ++q) nearest = std::min(nearest, dist_.metric(dist_.s2(node, path[q])));
        exact_[c] = {{nearest, node}, 0.0};
      }
    });
    TORCH_CHECK(!exact_.empty(), "tfp_walk: internal error: no unvisited node to scan");
    int64_t best = exact_[0].first.second;
    double best_d = exact_[0].first.first;
    for (const auto& e : exact_) {
      if (e.first.first > best_d || (e.first.first == best_d && e.first.second < best)) {
        best_d = e.first.first;
        best = e.first.second;
      }
    }
    return best;
  }

  static constexpr int8_t kInvalid = 0, kUndecided = 1, kSurelyValid = 2;

  // Approximate squared distances of every list row of `pass` to `last` (s2_last_), its node (node_, -1
  // when none is unvisited) and its status against the window (invalid: surely below t for some window
  // node; surely valid: surely >= t for all; undecided); kMins: also the smallest over the window (min_s2_).
  template <bool kMins>
  void approximate(const std::vector<int64_t>& pass, const int64_t* path, int64_t last, int64_t win_begin,
                   int64_t step) {
    query_.assign(1, last);
    for (int64_t q = win_begin; q < step - 1; ++q) query_.push_back(path[q]);
    const int64_t w = static_cast<int64_t>(query_.size());
    // the query rows in float32, from the embeddings (their rounding is in the bound), in blocks of
    // kQueryBlock (a short last block repeats its first row)
    const int64_t blocks = (w + kQueryBlock - 1) / kQueryBlock;
    query32_.resize(static_cast<size_t>(w * dim_));
    q_rows_.resize(static_cast<size_t>(blocks * kQueryBlock));
    lower_.resize(w);
    upper_.resize(w);
    for (int64_t q = 0; q < w; ++q) {
      dist_.prepared_row(query_[q], query32_.data() + q * dim_);
      // t^2 -/+ the bound of each window node, widened by the margin
      const double band = slack_[query_[q]] + 1e-9 * t2_;
      lower_[q] = t2_ - band;
      upper_[q] = t2_ + band;
    }
    for (int64_t b = 0; b < blocks * kQueryBlock; ++b) {
      const int64_t q = b < w ? b : (b / kQueryBlock) * kQueryBlock;
      q_rows_[b] = query32_.data() + q * dim_;
    }
    const int64_t rows = static_cast<int64_t>(pass.size());
    s2_last_.resize(rows);
    node_.resize(rows);
    status_.resize(rows);
    if (kMins) min_s2_.resize(rows);
    at::parallel_for(0, rows, 1024, [&](int64_t begin, int64_t end) {
      std::vector<float> dots(blocks * kQueryBlock);
      for (int64_t i = begin; i < end; ++i) {
        // (resolve advances group_next[row]: each row is another group, so threads never share one)
        const int64_t row = pass[i];
        const int64_t node = alive_[row] ? groups_.resolve(row, seen_) : -1;
        node_[i] = node;
        if (node < 0) {
          s2_last_[i] = std::numeric_limits<double>::infinity();
          status_[i] = kInvalid;
          if (kMins) min_s2_[i] = std::numeric_limits<double>::infinity();
          continue;
        }
        const int64_t rep = groups_.representative(row);
        for (int64_t b = 0; b < blocks; ++b) {
          row_dots_(rows16_ + rep * dim_, q_rows_.data() + b * kQueryBlock, dim_, dots.data() + b * kQueryBlock);
        }
        int8_t status = kSurelyValid;
        for (int64_t q = 0; q < w; ++q) {
          double a = sq_norms_[rep] + sq_norms_[query_[q]] - 2.0 * scale_[rep] * static_cast<double>(dots[q]);
          a = a < 0.0 ? 0.0 : a;
          if (q == 0) s2_last_[i] = a;
          if (kMins) min_s2_[i] = q == 0 ? a : std::min(min_s2_[i], a);
          if (a < lower_[q]) {
            status = kInvalid;
          } else if (a < upper_[q] && status == kSurelyValid) {
            status = kUndecided;
          }
        }
        status_[i] = status;
      }
    });
  }

  const ExactDistance<scalar_t>& dist_;
  const uint16_t* rows16_;
  int64_t dim_;
  const double* scale_;
  const double* sq_norms_;
  const double* slack_;
  const Groups& groups_;
  const bool* seen_;
  double t2_;
  bool farthest_;
  RowDotsFn row_dots_;
  std::vector<uint8_t> alive_;  // list rows with an unvisited node
  int64_t num_alive_ = 0;
  std::vector<int64_t> order_;  // the list rows the pass reads, in memory order: the alive ones and some dead
  std::vector<int64_t> query_;
  std::vector<float> query32_;
  std::vector<const float*> q_rows_;
  std::vector<double> lower_, upper_, s2_last_, values_, min_s2_;
  std::vector<int64_t> node_, cand_;
  std::vector<int8_t> status_;
  std::vector<std::pair<std::pair<double, int64_t>, double>> exact_;  // ((d, node), s2)
};

// Long lists of some list rows (see the header): long_row null when there are none.
struct LongLists {
  const int32_t* long_row = nullptr;  // (rows,) row of the long tables, or -1
  const int32_t* index = nullptr;     // (L, k) int32, -1 padded
  const float* s2 = nullptr;          // (L, k) float32
  const double* slack = nullptr;      // (L,) float64, bounds of |s2 - exact s2|
  int64_t k = 0;
};

// Close sets (optional): nodes among which lie all nodes closer than t to a node, for the rows where the cap
// could fire by their counts alone (see the op's comment in tfp_kernels.cpp).
struct CloseSets {
  const int64_t* offsets = nullptr;  // (rows + 1,)
  const int32_t* members = nullptr;

  bool has(int64_t row) const { return offsets && offsets[row + 1] > offsets[row]; }

  // The unvisited members of the set of `row`, in increasing order, into `out` (their number bounds the
  // unvisited nodes closer than t).
  void unvisited_members(int64_t row, const bool* seen, std::vector<int64_t>& out) const {
    out.clear();
    for (int64_t i = offsets[row]; i < offsets[row + 1]; ++i) {
      if (!seen[members[i]]) out.push_back(members[i]);
    }
  }

  // `out` (increasing) merged with the unvisited entries of a list (k entries, -1 padded), without repeats.
  static void add_unvisited(const int32_t* list, int64_t k, const bool* seen, std::vector<int64_t>& out) {
    const auto set_end = static_cast<std::ptrdiff_t>(out.size());
    for (int64_t j = 0; j < k && list[j] >= 0; ++j) {
      if (!seen[list[j]]) out.push_back(list[j]);
    }
    std::sort(out.begin() + set_end, out.end());
    std::inplace_merge(out.begin(), out.begin() + set_end, out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
  }
};

// The op's policy: "paper", or "spread" with its near-duplicate groups (UrgentGroups; group_of null when none).
struct WalkPolicy {
  bool spread = false;
  const int32_t* group_of = nullptr;  // (N,) group of two or more near-duplicates, -1 for the others
  const int64_t* offsets = nullptr;   // (G + 1,), groups by decreasing size
  const int64_t* members = nullptr;   // (M,) members of each group, increasing
  int64_t num_groups = 0;
};

// The host scan's inputs (FallbackScan): rows empty when the caller runs the scans.
struct ScanRows {
  const at::Tensor& rows;      // (N, D) float16, prepared rows / scale
  const at::Tensor& scale;     // (N,) float64, powers of two
  const at::Tensor& sq_norms;  // (N,) float64
  const at::Tensor& slack;     // (N,) float64, bounds of |s2_pass - s2_exact|
};

template <typename scalar_t>
int64_t walk_impl(const at::Tensor& embeddings, const at::Tensor& norms, const at::Tensor& band_index,
                  const at::Tensor& band_s2, const at::Tensor& band_limit2, const at::Tensor& band_slack,
                  const at::Tensor& num_close, const ScanRows& scan_in, at::Tensor& path, at::Tensor& visited,
                  at::Tensor& counters, int64_t step, int64_t stop_step, double threshold, int64_t window,
                  int64_t max_rejections, bool cosine, const Groups& groups, const LongLists& long_lists,
                  const CloseSets& close_sets, const WalkPolicy& policy) {
  const int64_t n = embeddings.size(0);
  const int64_t band_k = band_index.size(1);
  const ExactDistance<scalar_t> dist{embeddings.data_ptr<scalar_t>(), cosine ? norms.data_ptr<double>() : nullptr,
                                     embeddings.size(1), cosine};
  const int32_t* index = band_index.data_ptr<int32_t>();
  const float* s2_approx = band_s2.data_ptr<float>();
  const double* limit2 = band_limit2.data_ptr<double>();
  const double* slack = band_slack.data_ptr<double>();
  const int32_t* close = num_close.data_ptr<int32_t>();
  int64_t* p = path.data_ptr<int64_t>();
  bool* seen = visited.data_ptr<bool>();
  const bool scan_here = scan_in.rows.numel() > 0;
  std::unique_ptr<FallbackScan<scalar_t>> scan;
  if (scan_here) {
    const double t2 = cosine ? 2.0 * threshold : threshold * threshold;  // the threshold on squared distances
    scan = std::make_unique<FallbackScan<scalar_t>>(
        dist, scan_in.rows, scan_in.scale.data_ptr<double>(), scan_in.sq_norms.data_ptr<double>(),
        scan_in.slack.data_ptr<double>(), seen, groups, groups.group_of ? band_limit2.numel() : n, t2, policy.spread);
  }
  // the spread policy's urgent groups (none with t = 0: duplicates are then valid neighbours)
  std::unique_ptr<UrgentGroups> urgent;
  if (policy.spread && policy.num_groups > 0 && threshold > 0) {
    urgent = std::make_unique<UrgentGroups>(policy.group_of, policy.offsets, policy.members, policy.num_groups, seen);
  }

  int64_t fallbacks = 0;
  int64_t set_scans = 0;  // scans settled over a close set and a list instead of every unvisited row
  std::vector<int64_t> set_pass;
  int64_t cap_fallbacks = 0;  // scans (here or returned) where the cap could fire (fresh lists avoid few)
  int64_t stale_entries = 0;  // visited entries of the lists that could not decide (without the cap)
  int64_t forced_steps = 0, first_forced = -1;  // scans here whose pick is closer than t to a window node
  auto flush_counters = [&]() {
    int64_t* counts = counters.data_ptr<int64_t>();  // (the slots are named in csrc/tfp_kernels.cpp)
    counts[0] += fallbacks;
    counts[1] += cap_fallbacks;
    counts[2] += stale_entries;
    counts[3] += set_scans;
    counts[4] += forced_steps;
    if (counts[5] < 0) counts[5] = first_forced;
  };
  UnitRows<scalar_t> unit(dist, window);
  const int64_t end = stop_step < 0 ? n : std::min(n, stop_step);
  for (; step < end; ++step) {
    if (urgent) {
      const int64_t node = urgent->pick(p, step, n, window, threshold, dist, seen);
      if (node >= 0) {
        p[step] = node;
        seen[node] = true;
        if (scan_here) scan->remove(node);
        urgent->taken(node);
        continue;
      }
    }
    const int64_t last = p[step - 1];
    const int64_t remaining = n - step;
    const int64_t win_begin = std::max<int64_t>(0, step - window);
    const int64_t row = groups.list_row(last);
    const int32_t* list = index + row * band_k;
    const float* list_s2 = s2_approx + row * band_k;
    int64_t k = band_k;
    double list_slack = slack[last];
    if (long_lists.long_row && long_lists.long_row[row] >= 0) {
      const int64_t at = long_lists.long_row[row];
      k = long_lists.k;
      list = long_lists.index + at * k;
      list_s2 = long_lists.s2 + at * k;
      list_slack = long_lists.slack[at];  // (float64 lists: the walk stops at the entries a hair past the best)
    }
    int64_t best = -1;
    double best_d = std::numeric_limits<double>::infinity();
    double best_s2 = std::numeric_limits<double>::infinity();
    const double* unit_last = unit.enabled() ? unit.at_position(step - 1, last) : nullptr;  // (cosine)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t entry = list[j];
      if (entry < 0) break;
      // entries are sorted by approximate s2; their exact s2 is at least list_s2[j] - list_slack
      if (best >= 0 && static_cast<double>(list_s2[j]) - list_slack > best_s2) break;
      const int64_t c = groups.resolve(entry, seen);
      if (c < 0) continue;
      // start fetching the row of the next unvisited entry while this one is computed (rows are KBs
      // in DRAM at random places: the walk is bound by their latency, not by the arithmetic)
      // (only a row the walk reads should this entry be the pick: one more than twice the bound past it is
      // read only where this one is invalid, and a row fetched for nothing holds the fill buffers the next
      // rows need; measured at N = 100,000: 5.7 -> 5.3 us per step)
      const double reach = std::min(best_s2, static_cast<double>(list_s2[j]) + list_slack);
      for (int64_t j2 = j + 1; j2 < k && list[j2] >= 0; ++j2) {
        if (static_cast<double>(list_s2[j2]) - list_slack > reach) break;
        const int64_t c2 = groups.resolve(list[j2], seen);
        if (c2 < 0) continue;
        dist.prefetch(c2);
        break;
      }
      const double* unit_c = unit_last ? unit.entry(c) : nullptr;
      const double c_s2 = unit_last ? unit.s2(unit_last, unit_c) : dist.s2(last, c);
      const double c_d = dist.metric(c_s2);
      if (c_d < threshold) continue;  // too close to last
      if (best >= 0 && (c_d > best_d || (c_d == best_d && c > best))) continue;
      bool valid = true;
      for (int64_t q = win_begin; q < step - 1 && valid; ++q) {
        valid = dist.metric(unit_last ? unit.s2(unit_c, unit.at_position(q, p[q])) : dist.s2(c, p[q])) >= threshold;
      }
      if (!valid) continue;
      best = c;
      best_d = c_d;
      best_s2 = c_s2;
    }
    // (the list's best has at most k - 1 unvisited nodes >= t ahead of it, all in the list, and those closer
    // than t: the cap cannot fire before it while their count + k < max_rejections)
    bool cap_may_fire = max_rejections >= 0 && remaining > max_rejections &&
                        static_cast<int64_t>(close[row]) + k >= max_rejections;
    const bool with_set = cap_may_fire && close_sets.has(row);
    if (with_set) {  // fewer by the set: its unvisited members (kept for the scan below)
      close_sets.unvisited_members(row, seen, set_pass);
      const int64_t alive = std::min<int64_t>(close[row], static_cast<int64_t>(set_pass.size()));
      cap_may_fire = alive + k >= max_rejections;
    }
    const bool proven = best >= 0 && best_s2 < limit2[row] && !cap_may_fire;
    if (!proven) {
      // nothing certain in the list, or the cap might fire: the exact scan decides. How stale the list
      // is (its entries visited since it was built) tells the caller whether fresh lists would avoid such
      // scans: a list without visited entries is what a rebuild would give again
      if (!cap_may_fire) {
        for (int64_t j = 0; j < k && list[j] >= 0; ++j) stale_entries += groups.resolve(list[j], seen) < 0;
      } else {
        ++cap_fallbacks;
      }
      if (!scan_here) {
        flush_counters();
        return step;
      }
      best = -1;
      if (cap_may_fire && with_set && !groups.group_of) {
        // the nodes that may precede a pick nearer than the list's limit: the unvisited ones closer than t (in
        // the set) and those of the list; a pass over them instead of every unvisited row when it decides
        CloseSets::add_unvisited(list, k, seen, set_pass);
        best = scan->pick_among(set_pass, limit2[row], p, step, window, threshold, max_rejections);
        set_scans += best >= 0;
      }
      if (best < 0) best = scan->pick(p, step, window, threshold, max_rejections);
      ++fallbacks;
      // (the lists' picks are valid; a scan's is not where no node was, or where the cap took an invalid one)
      bool valid = true;
      for (int64_t q = win_begin; q < step && valid; ++q) valid = dist.metric(dist.s2(best, p[q])) >= threshold;
      if (!valid && first_forced < 0) first_forced = step;
      forced_steps += !valid;
    }
    p[step] = best;
    seen[best] = true;
    if (scan_here) scan->remove(best);
    if (urgent) urgent->taken(best);
  }
  flush_counters();
  return step;
}

// The op's policy and policy_groups, checked (see the op's comment in tfp_kernels.cpp).
WalkPolicy check_policy(c10::string_view policy, const std::optional<at::TensorList>& policy_groups, int64_t n,
                        int64_t max_rejections) {
  TORCH_CHECK(policy == "paper" || policy == "spread", "tfp_walk: policy must be 'paper' or 'spread', got '",
              std::string(policy), "'");
  WalkPolicy out;
  out.spread = policy == "spread";
  TORCH_CHECK(!out.spread || max_rejections < 0, "tfp_walk: the 'spread' policy takes no rejection cap");
  if (!policy_groups.has_value()) return out;
  TORCH_CHECK(out.spread, "tfp_walk: policy_groups go with policy 'spread'");
  const at::TensorList t = *policy_groups;
  TORCH_CHECK(t.size() == 3, "tfp_walk: policy_groups must be [group_of, offsets, members], got ", t.size(),
              " tensors");
  for (const at::Tensor& x : t) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 1,
                "tfp_walk: policy_groups must be 1-D contiguous CPU tensors");
  }
  TFP_CHECK_DTYPE(t[0], at::kInt);
  TFP_CHECK_DTYPE(t[1], at::kLong);
  TFP_CHECK_DTYPE(t[2], at::kLong);
  TORCH_CHECK(t[0].numel() == n && t[1].numel() >= 1, "tfp_walk: policy_groups' group_of must have N = ", n,
              " entries and offsets at least one");
  const int64_t groups = t[1].numel() - 1;
  const int64_t* offsets = t[1].data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[groups] == t[2].numel(),
              "tfp_walk: policy_groups' offsets must run from 0 to the members' ", t[2].numel(), " entries");
  // (the entries are not range-checked here: a pass over N per call; policy.py makes them from torch.unique)
  out.group_of = t[0].data_ptr<int32_t>();
  out.offsets = offsets;
  out.members = t[2].data_ptr<int64_t>();
  out.num_groups = groups;
  return out;
}

}  // namespace

int64_t tfp_walk_cpu(const at::Tensor& embeddings, const at::Tensor& norms, const at::Tensor& band_index,
                     const at::Tensor& band_s2, const at::Tensor& band_limit2, const at::Tensor& band_slack,
                     const at::Tensor& num_close, const at::Tensor& scan_rows, const at::Tensor& scan_scale,
                     const at::Tensor& scan_sq_norms, const at::Tensor& scan_slack, at::Tensor& path,
                     at::Tensor& visited, at::Tensor& counters, int64_t step, int64_t stop_step,
                     double threshold, int64_t window, int64_t max_rejections, bool cosine,
                     const std::optional<at::Tensor>& group_of, const std::optional<at::Tensor>& group_offsets,
                     const std::optional<at::Tensor>& group_members, const std::optional<at::Tensor>& group_next,
                     const std::optional<at::Tensor>& long_row, const std::optional<at::Tensor>& long_index,
                     const std::optional<at::Tensor>& long_s2, const std::optional<at::Tensor>& long_slack,
                     const std::optional<at::Tensor>& close_offsets,
                     const std::optional<at::Tensor>& close_members, c10::string_view policy,
                     std::optional<at::TensorList> policy_groups) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &embeddings, &norms, &band_index, &band_s2, &band_limit2, &band_slack, &num_close, &scan_rows,
           &scan_scale, &scan_sq_norms, &scan_slack, &path, &visited, &counters}) {
    TORCH_CHECK(t->device().is_cpu(), "tfp_walk: every tensor must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "tfp_walk: every tensor must be contiguous");
  }
  TFP_CHECK_DIM(embeddings, 2);
  const int64_t n = embeddings.size(0);
  TORCH_CHECK(embeddings.scalar_type() == at::kFloat || embeddings.scalar_type() == at::kDouble,
              "tfp_walk: embeddings must be float32 or float64, got ", embeddings.scalar_type());
  TFP_CHECK_DTYPE(band_index, at::kInt);
  TFP_CHECK_DTYPE(band_s2, at::kFloat);
  TFP_CHECK_DTYPE(band_limit2, at::kDouble);
  TFP_CHECK_DTYPE(band_slack, at::kDouble);
  TFP_CHECK_DTYPE(num_close, at::kInt);
  TFP_CHECK_DTYPE(path, at::kLong);
  TFP_CHECK_DTYPE(visited, at::kBool);
  const int grouped = group_of.has_value() + group_offsets.has_value() + group_members.has_value() +
                      group_next.has_value();
  TORCH_CHECK(grouped == 0 || grouped == 4,
              "tfp_walk: pass all of group_of, group_offsets, group_members, group_next, or none");
  Groups groups;
  int64_t rows = n;  // rows of the band tables: nodes, or groups
  if (grouped) {
    const auto& g_of = *group_of;
    const auto& g_off = *group_offsets;
    const auto& g_mem = *group_members;
    const auto& g_next = *group_next;
    for (const at::Tensor* t : {&g_of, &g_off, &g_mem, &g_next}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "tfp_walk: group tensors must be contiguous CPU tensors");
    }
    TFP_CHECK_DTYPE(g_of, at::kInt);
    TFP_CHECK_DTYPE(g_off, at::kLong);
    TFP_CHECK_DTYPE(g_mem, at::kLong);
    TFP_CHECK_DTYPE(g_next, at::kLong);
    rows = g_next.numel();
    TORCH_CHECK(g_of.numel() == n && g_mem.numel() == n && g_off.numel() == rows + 1,
                "tfp_walk: group_of and group_members need N = ", n, " entries and group_offsets U + 1 = ", rows + 1);
    groups = Groups{g_of.data_ptr<int32_t>(), g_off.data_ptr<int64_t>(), g_mem.data_ptr<int64_t>(),
                    g_next.data_ptr<int64_t>()};
  }
  TORCH_CHECK(band_index.dim() == 2 && band_index.size(0) == rows && band_s2.sizes() == band_index.sizes(),
              "tfp_walk: band_index and band_s2 must have shape (", rows, ", K)");
  TORCH_CHECK(band_limit2.numel() == rows && num_close.numel() == rows,
              "tfp_walk: band_limit2 and num_close must have ", rows, " entries (one per list)");
  TORCH_CHECK(band_slack.numel() == n && path.numel() == n && visited.numel() == n,
              "tfp_walk: per-node tensors must have N = ", n, " entries");
  TORCH_CHECK(!cosine || norms.numel() == n, "tfp_walk: cosine needs the (N,) float64 row norms");
  TORCH_CHECK(scan_rows.numel() == 0 || (scan_rows.dim() == 2 && scan_rows.size(0) == n &&
                                         scan_rows.size(1) == embeddings.size(1) &&
                                         scan_rows.scalar_type() == at::kHalf),
              "tfp_walk: scan_rows must be empty or the (N, D) = (", n, ", ", embeddings.size(1),
              ") float16 scaled prepared rows");
  if (scan_rows.numel() > 0) {
    for (const at::Tensor* t : {&scan_scale, &scan_sq_norms, &scan_slack}) {
      TORCH_CHECK(t->scalar_type() == at::kDouble && t->numel() == n,
                  "tfp_walk: scan_scale, scan_sq_norms and scan_slack must be (N,) = (", n, ",) float64");
    }
  }
  TORCH_CHECK(counters.numel() == 6 && counters.scalar_type() == at::kLong && counters.is_contiguous(),
              "tfp_walk: counters must be a contiguous (6,) int64 tensor [scans, cap_scans, stale_entries, "
              "close_set_scans, forced_steps, first_forced_step], got shape ", counters.sizes(), " and dtype ",
              counters.scalar_type());
  if (cosine) TFP_CHECK_DTYPE(norms, at::kDouble);
  const int long_given = long_row.has_value() + long_index.has_value() + long_s2.has_value() + long_slack.has_value();
  TORCH_CHECK(long_given == 0 || long_given == 4,
              "tfp_walk: pass all of long_row, long_index, long_s2, long_slack, or none");
  LongLists long_lists;
  if (long_given) {
    for (const at::Tensor* t : {&*long_row, &*long_index, &*long_s2, &*long_slack}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "tfp_walk: long-list tensors must be contiguous CPU tensors");
    }
    TFP_CHECK_DTYPE((*long_row), at::kInt);
    TFP_CHECK_DTYPE((*long_index), at::kInt);
    TFP_CHECK_DTYPE((*long_s2), at::kFloat);
    TFP_CHECK_DTYPE((*long_slack), at::kDouble);
    TORCH_CHECK(long_row->numel() == rows, "tfp_walk: long_row must have ", rows, " entries (one per list)");
    TORCH_CHECK(long_index->dim() == 2 && long_s2->sizes() == long_index->sizes(),
                "tfp_walk: long_index and long_s2 must have the same shape (L, K_long)");
    TORCH_CHECK(long_slack->numel() == long_index->size(0), "tfp_walk: long_slack must have L = ",
                long_index->size(0), " entries (one per long list)");
    // (long_row's entries must lie in [-1, L): its callers make them so (fast.py and the sharded walk point each
    // row at a row they append); checking them here would cost a pass over N rows per call, i.e. per scan)
    long_lists = LongLists{long_row->data_ptr<int32_t>(), long_index->data_ptr<int32_t>(), long_s2->data_ptr<float>(),
                           long_slack->data_ptr<double>(), long_index->size(1)};
  }
  TORCH_CHECK(close_offsets.has_value() == close_members.has_value(),
              "tfp_walk: pass both close_offsets and close_members, or neither");
  CloseSets close_sets;
  if (close_offsets.has_value()) {
    const auto& off = *close_offsets;
    const auto& mem = *close_members;
    for (const at::Tensor* t : {&off, &mem}) {
      TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "tfp_walk: close sets must be contiguous CPU tensors");
    }
    TORCH_CHECK(off.scalar_type() == at::kLong, "tfp_walk: close_offsets must have dtype Long, got ",
                off.scalar_type());
    TORCH_CHECK(mem.scalar_type() == at::kInt, "tfp_walk: close_members must have dtype Int, got ",
                mem.scalar_type());
    TORCH_CHECK(off.dim() == 1 && off.numel() == rows + 1, "tfp_walk: close_offsets must have U + 1 = ", rows + 1,
                " entries");
    const int64_t* o = off.data_ptr<int64_t>();
    TORCH_CHECK(o[0] == 0 && o[rows] == mem.numel(), "tfp_walk: close_offsets must run from 0 to close_members' ",
                mem.numel(), " entries");
    // (members are not range-checked here: a pass over them per call; fast.py makes them from row ids)
    close_sets = CloseSets{o, mem.data_ptr<int32_t>()};
  }
  TORCH_CHECK(step >= 1 && step <= n, "tfp_walk: step must lie in [1, N], got ", step);
  TORCH_CHECK(window >= 1, "tfp_walk: window must be >= 1, got ", window);
  const WalkPolicy walk_policy = check_policy(policy, policy_groups, n, max_rejections);
  const ScanRows scan_in{scan_rows, scan_scale, scan_sq_norms, scan_slack};
  if (embeddings.scalar_type() == at::kFloat) {
    return walk_impl<float>(embeddings, norms, band_index, band_s2, band_limit2, band_slack, num_close, scan_in,
                            path, visited, counters, step, stop_step, threshold, window, max_rejections,
                            cosine, groups, long_lists, close_sets, walk_policy);
  }
  return walk_impl<double>(embeddings, norms, band_index, band_s2, band_limit2, band_slack, num_close, scan_in,
                           path, visited, counters, step, stop_step, threshold, window, max_rejections,
                           cosine, groups, long_lists, close_sets, walk_policy);
}

}  // namespace tfp
