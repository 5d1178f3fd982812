// The TFP walk over band lists (DESIGN.md 1.1 and 2.1), on the CPU.
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
// With `projections` (N, r) given, the scan runs here (FallbackScan below) and the walk completes;
// without them the op returns the step that needs the scan and the caller runs it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <memory>
#include <utility>
#include <vector>

#include "checks.h"
#include "ops.h"

namespace tfp {
namespace {

template <typename scalar_t>
struct ExactDistance {
  static constexpr int kLanes = 8;
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

  // Squared L2 distance of the prepared rows (unit rows for cosine), in double. Eight independent
  // partial sums let the compiler vectorise the loop and hide the add latency.
  double s2(int64_t a, int64_t b) const {
    const scalar_t* pa = x + a * dim;
    const scalar_t* pb = x + b * dim;
    double acc[kLanes] = {0.0};
    int64_t k = 0;
    if (cosine) {
      const double na = norms[a], nb = norms[b];
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

  // The metric distance from a squared distance, computed as the reference does.
  double metric(double s2_value) const {
    const double l2 = std::sqrt(s2_value);
    return cosine ? 0.5 * l2 * l2 : l2;
  }
};

// Exact-duplicate groups: band lists hold group ids; a group stands for its next unvisited member.
struct Groups {
  const int32_t* group_of = nullptr;     // (N,) node -> group; nullptr: no grouping (lists hold nodes)
  const int64_t* offsets = nullptr;      // (U + 1,)
  const int64_t* members = nullptr;      // (N,) members of each group, increasing
  int64_t* next = nullptr;               // (U,) position of the first possibly-unvisited member

  int64_t list_row(int64_t node) const { return group_of ? group_of[node] : node; }

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

// Exact scan of the unvisited nodes for the rule's pick after `last`. Candidates are visited in the
// order of a lower bound of their squared distance to `last` (the squared distance of their
// projections on an orthonormal basis, which cannot exceed the true one), in growing batches, and
// exact distances are computed only until the pick is proven.
template <typename scalar_t>
class FallbackScan {
 public:
  // With groups, the scan runs over the groups that still have an unvisited member: one distance per
  // group, standing for its next unvisited member (the one the rule takes among equals).
  FallbackScan(const ExactDistance<scalar_t>& dist, const double* proj, int64_t rank, int64_t n, const bool* seen,
               const Groups& groups, int64_t num_rows)
      : dist_(dist), proj_(proj), rank_(rank), groups_(groups), seen_(seen), position_(num_rows, -1) {
    for (int64_t i = 0; i < num_rows; ++i) {
      if (groups_.resolve(i, seen) >= 0) {
        position_[i] = static_cast<int64_t>(unvisited_.size());
        unvisited_.push_back(i);
      }
    }
  }

  // Call after marking `node` visited.
  void remove(int64_t node) {
    const int64_t row = groups_.list_row(node);
    if (position_[row] < 0 || groups_.resolve(row, seen_) >= 0) return;  // the group still has members
    const int64_t at = position_[row];
    const int64_t moved = unvisited_.back();
    unvisited_[at] = moved;
    position_[moved] = at;
    unvisited_.pop_back();
    position_[row] = -1;
  }

  int64_t pick(const int64_t* path, int64_t step, int64_t window, double threshold, int64_t max_rejections) {
    const int64_t last = path[step - 1];
    const int64_t win_begin = std::max<int64_t>(0, step - window);
    const int64_t n_u = static_cast<int64_t>(unvisited_.size());
    const bool capped = max_rejections >= 0 && n_u > max_rejections;
    constexpr double kSafety = 1.0 - 1e-12;  // the float64 projected distances are exact to ~1e-15
    // with groups the cap is never used (the caller does not group then), so counts of rows are counts of nodes
    bound_.resize(n_u);
    const double* yl = proj_ + last * rank_;
    at::parallel_for(0, n_u, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t node = groups_.resolve(unvisited_[i], seen_);  // a member: identical projections
        const double* yu = proj_ + node * rank_;
        double acc = 0.0;
        for (int64_t r = 0; r < rank_; ++r) {
          const double diff = yl[r] - yu[r];
          acc += diff * diff;
        }
        bound_[i] = {acc * kSafety, node};
      }
    });
    exact_.clear();
    int64_t best = -1;
    double best_d = std::numeric_limits<double>::infinity(), best_s2 = best_d;
    int64_t done = 0;
    int64_t batch = std::min<int64_t>(n_u, 256);
    while (true) {
      double outside = std::numeric_limits<double>::infinity();  // lower bound of s2 beyond the batch
      if (batch < n_u) {
        std::nth_element(bound_.begin() + done, bound_.begin() + batch, bound_.end());
        outside = bound_[batch].first;
      }
      // exact distances of the batch to `last` on all threads, then the window test in exact order, only
      // until the first valid candidate (nothing after it in this batch can be the pick)
      const int64_t first_new = static_cast<int64_t>(exact_.size());
      exact_.resize(first_new + (batch - done));
      at::parallel_for(done, batch, 64, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t c = bound_[i].second;
          const double c_s2 = dist_.s2(last, c);
          exact_[first_new + (i - done)] = {{dist_.metric(c_s2), c}, c_s2};
        }
      });
      order_.resize(batch - done);
      for (int64_t i = 0; i < batch - done; ++i) order_[i] = first_new + i;
      std::sort(order_.begin(), order_.end(), [&](int64_t a, int64_t b) { return exact_[a].first < exact_[b].first; });
      for (const int64_t e : order_) {
        const double c_d = exact_[e].first.first;
        const int64_t c = exact_[e].first.second;
        if (c_d < threshold) continue;
        if (best >= 0 && (c_d > best_d || (c_d == best_d && c > best))) break;  // sorted: none better follows
        bool valid = true;
        for (int64_t q = win_begin; q < step - 1 && valid; ++q) valid = dist_.metric(dist_.s2(c, path[q])) >= threshold;
        if (valid) {
          best = c;
          best_d = c_d;
          best_s2 = exact_[e].second;
          break;
        }
      }
      done = batch;
      if (best >= 0 && best_s2 < outside) {
        if (!capped) return best;
        int64_t ahead = 0;
        for (const auto& e : exact_) ahead += e.first < std::make_pair(best_d, best);
        if (ahead < max_rejections) return best;
      }
      int64_t sure = 0;
      for (const auto& e : exact_) sure += e.second < outside;
      if (capped && sure > max_rejections) {
        // every valid node would rank below M and be proven above: the first M are invalid, take c_M
        std::nth_element(exact_.begin(), exact_.begin() + max_rejections, exact_.end());
        return exact_[max_rejections].first.second;
      }
      if (!capped && done == n_u) {  // nothing valid anywhere: c_0
        return std::min_element(exact_.begin(), exact_.end())->first.second;
      }
      batch = std::min<int64_t>(n_u, batch * 4);
    }
  }

 private:
  const ExactDistance<scalar_t>& dist_;
  const double* proj_;
  int64_t rank_;
  const Groups& groups_;
  const bool* seen_;
  std::vector<int64_t> position_;
  std::vector<int64_t> unvisited_;
  std::vector<std::pair<double, int64_t>> bound_;
  std::vector<std::pair<std::pair<double, int64_t>, double>> exact_;  // ((d, node), s2)
  std::vector<int64_t> order_;
};

template <typename scalar_t>
int64_t walk_impl(const at::Tensor& embeddings, const at::Tensor& norms, const at::Tensor& band_index,
                  const at::Tensor& band_s2, const at::Tensor& band_limit2, const at::Tensor& band_slack,
                  const at::Tensor& num_close, const at::Tensor& projections, at::Tensor& path, at::Tensor& visited,
                  at::Tensor& num_fallbacks, int64_t step, int64_t stop_step, double threshold, int64_t window,
                  int64_t max_rejections, bool cosine, const Groups& groups) {
  const int64_t n = embeddings.size(0);
  const int64_t k = band_index.size(1);
  const ExactDistance<scalar_t> dist{embeddings.data_ptr<scalar_t>(), cosine ? norms.data_ptr<double>() : nullptr,
                                     embeddings.size(1), cosine};
  const int32_t* index = band_index.data_ptr<int32_t>();
  const float* s2_approx = band_s2.data_ptr<float>();
  const double* limit2 = band_limit2.data_ptr<double>();
  const double* slack = band_slack.data_ptr<double>();
  const int32_t* close = num_close.data_ptr<int32_t>();
  int64_t* p = path.data_ptr<int64_t>();
  bool* seen = visited.data_ptr<bool>();
  const bool scan_here = projections.numel() > 0;
  std::unique_ptr<FallbackScan<scalar_t>> scan;
  if (scan_here) {
    scan = std::make_unique<FallbackScan<scalar_t>>(dist, projections.data_ptr<double>(), projections.size(1), n, seen,
                                                    groups, groups.group_of ? band_limit2.numel() : n);
  }

  int64_t fallbacks = 0;
  int64_t cap_fallbacks = 0;  // scans where the cap could fire (fresh lists avoid few of them)
  const int64_t end = stop_step < 0 ? n : std::min(n, stop_step);
  for (; step < end; ++step) {
    const int64_t last = p[step - 1];
    const int64_t remaining = n - step;
    const int64_t win_begin = std::max<int64_t>(0, step - window);
    const int64_t row = groups.list_row(last);
    const int32_t* list = index + row * k;
    const float* list_s2 = s2_approx + row * k;
    int64_t best = -1;
    double best_d = std::numeric_limits<double>::infinity();
    double best_s2 = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < k; ++j) {
      const int64_t entry = list[j];
      if (entry < 0) break;
      // entries are sorted by approximate s2; their exact s2 is at least list_s2[j] - slack[last]
      if (best >= 0 && static_cast<double>(list_s2[j]) - slack[last] > best_s2) break;
      const int64_t c = groups.resolve(entry, seen);
      if (c < 0) continue;
      // start fetching the row of the next unvisited entry while this one is computed (rows are KBs
      // in DRAM at random places: the walk is bound by their latency, not by the arithmetic)
      for (int64_t j2 = j + 1; j2 < k && list[j2] >= 0; ++j2) {
        const int64_t c2 = groups.resolve(list[j2], seen);
        if (c2 < 0) continue;
        dist.prefetch(c2);
        break;
      }
      const double c_s2 = dist.s2(last, c);
      const double c_d = dist.metric(c_s2);
      if (c_d < threshold) continue;  // too close to last
      if (best >= 0 && (c_d > best_d || (c_d == best_d && c > best))) continue;
      bool valid = true;
      for (int64_t q = win_begin; q < step - 1 && valid; ++q) valid = dist.metric(dist.s2(c, p[q])) >= threshold;
      if (!valid) continue;
      best = c;
      best_d = c_d;
      best_s2 = c_s2;
    }
    const bool cap_may_fire = max_rejections >= 0 && remaining > max_rejections &&
                              static_cast<int64_t>(close[row]) + k >= max_rejections;
    const bool proven = best >= 0 && best_s2 < limit2[row] && !cap_may_fire;
    if (!proven) {
      // nothing certain in the list, or the cap might fire: the exact scan decides
      if (!scan_here) return step;
      best = scan->pick(p, step, window, threshold, max_rejections);
      ++fallbacks;
      if (cap_may_fire) ++cap_fallbacks;
    }
    p[step] = best;
    seen[best] = true;
    if (scan_here) scan->remove(best);
  }
  if (num_fallbacks.numel() > 0) num_fallbacks.data_ptr<int64_t>()[0] += fallbacks;
  if (num_fallbacks.numel() > 1) num_fallbacks.data_ptr<int64_t>()[1] += cap_fallbacks;
  return step;
}

}  // namespace

int64_t tfp_walk_cpu(const at::Tensor& embeddings, const at::Tensor& norms, const at::Tensor& band_index,
                     const at::Tensor& band_s2, const at::Tensor& band_limit2, const at::Tensor& band_slack,
                     const at::Tensor& num_close, const at::Tensor& projections, at::Tensor& path,
                     at::Tensor& visited, at::Tensor& num_fallbacks, int64_t step, int64_t stop_step,
                     double threshold, int64_t window, int64_t max_rejections, bool cosine,
                     const std::optional<at::Tensor>& group_of, const std::optional<at::Tensor>& group_offsets,
                     const std::optional<at::Tensor>& group_members, const std::optional<at::Tensor>& group_next) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{
           &embeddings, &norms, &band_index, &band_s2, &band_limit2, &band_slack, &num_close, &projections, &path,
           &visited, &num_fallbacks}) {
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
  TORCH_CHECK(projections.numel() == 0 || (projections.dim() == 2 && projections.size(0) == n &&
                                           projections.scalar_type() == at::kDouble),
              "tfp_walk: projections must be empty or (N, r) float64");
  TORCH_CHECK(num_fallbacks.numel() == 0 || num_fallbacks.scalar_type() == at::kLong,
              "tfp_walk: num_fallbacks must be empty or an int64 counter");
  if (cosine) TFP_CHECK_DTYPE(norms, at::kDouble);
  TORCH_CHECK(step >= 1 && step <= n, "tfp_walk: step must lie in [1, N], got ", step);
  TORCH_CHECK(window >= 1, "tfp_walk: window must be >= 1, got ", window);
  if (embeddings.scalar_type() == at::kFloat) {
    return walk_impl<float>(embeddings, norms, band_index, band_s2, band_limit2, band_slack, num_close, projections,
                            path, visited, num_fallbacks, step, stop_step, threshold, window, max_rejections,
                            cosine, groups);
  }
  return walk_impl<double>(embeddings, norms, band_index, band_s2, band_limit2, band_slack, num_close, projections,
                           path, visited, num_fallbacks, step, stop_step, threshold, window, max_rejections,
                           cosine, groups);
}

}  // namespace tfp
