// The one registration file: every op of tfp_kernels is declared here with its schema, and its CPU and
// CUDA implementations are attached with TORCH_LIBRARY_IMPL. Python calls them as
// torch.ops.tfp_kernels.<name>. CUDA implementations are compiled only with -DWITH_CUDA.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(tfp_kernels, m) {
  // Version of the CUDA toolkit the extension was compiled with (e.g. 13000 for 13.0), or -1 when it
  // was compiled without CUDA. Checked against torch.version.cuda at import.
  m.def("cuda_version() -> int", &tfp::cuda_version);
  m.def("parallel_threads() -> int", &tfp::parallel_threads);
  // Ordered next-fit bin packing: lengths (N,) int64 -> pack id of every item (N,) int64.
  m.def("next_fit_pack_ids(Tensor lengths, int max_len) -> Tensor");
  // --- bin packing (best fit) and packed-batch assembly (tfp_kernels/packing, tfp_kernels/assembly) ---
  // Best fit decreasing of lengths (M,) int64 into packs of max_len, globally (window >= M) or inside
  // consecutive windows of `window` items. Returns (order, pack_id, length) (M,) int64 and pack_offsets
  // (P + 1,) int64: the items listed pack by pack (packs numbered by their first item, items in input
  // order inside a pack), the pack and length of each listed item, the token offsets of the packs.
  // CPU only (sequential); CUDA callers pack a host copy.
  m.def("best_fit_decreasing(Tensor lengths, int max_len, int window) -> (Tensor, Tensor, Tensor, Tensor)");
  // The TFP paper's packer: lengths (N,) int64 concatenated and cut every max_len tokens. Returns
  // (item, offset, length, pack_id), each (M,) int64: one piece per (item, pack) it touches, in stream
  // order. CPU; CUDA tensors use vectorised torch ops instead.
  m.def("stream_pack(Tensor lengths, int max_len) -> (Tensor, Tensor, Tensor, Tensor)");
  // Next fit in order, each pack topped up from the items [first, first + window) ahead of it:
  // lengths (M,) int64; without rows the longest fitting candidate joins, with rows (M, D) float32 the one
  // of best mean cosine similarity to the pack + fill_weight * length / room, candidates closer than
  // min_distance (l2, or 1 - cos when cosine) to an item of the pack only when no other fits (with
  // keep_apart = K >= 1: never; and next fit passes over up to K such items per pack). Returns
  // (order, pack_id, length) (M,) int64 and pack_offsets (P + 1,) int64, as best_fit_decreasing does
  // (packs numbered by their first item, items in input order inside a pack). CPU only (sequential).
  m.def(
      "fill_in_order(Tensor lengths, int max_len, int window, Tensor? rows=None, float fill_weight=2.0, "
      "float min_distance=0.0, bool cosine=False, int keep_apart=0) -> (Tensor, Tensor, Tensor, Tensor)");
  // Packed-batch assembly: gathers the pieces of the (4, M) int64 table (rows: source start in values,
  // output start, length, position id of the first token) into flat (num_tokens,) int64 input_ids,
  // labels (labels or values; ignore_index where the position id is 0) and position_ids.
  m.def(
      "assemble(Tensor values, Tensor? labels, Tensor pieces, int num_tokens, int ignore_index) -> "
      "(Tensor, Tensor, Tensor)");
  // --- end of the packing/assembly block ---
  // --- ordering ---
  // The TFP walk over band lists, from `step` on, with exact double-precision checks; host tensors only
  // (the lists of CUDA runs are copied to the host). Fills path/visited in place. With scan_rows, the
  // (N, D) float16 prepared rows (unit rows for cosine) divided by scan_scale (N,) float64 (powers of two),
  // with scan_sq_norms (N,) float64 their squared norms and scan_slack (N,) float64 the bound of the pass's
  // squared distances (tfp_kernels/order/host_scan.py: half_scan_rows), it runs the exact fallback scans itself
  // (a product pass over those rows, settled in double) and returns N; with an empty scan_rows tensor it
  // returns the step at which a fallback scan is needed (N when the path is complete; the other scan_*
  // tensors are then ignored).
  // counters: (6,) int64, added to (named in tfp_kernels/order/walk_op.py, WalkCounters): [0] scans run here;
  // [1] steps that need a scan (run here or returned to the caller) where the rejection cap could fire; [2] over
  // the steps whose list could not decide while the cap could not fire (scanned here or returned), the list's
  // entries already visited (how much fresher lists could have helped); [3] scans run here over a close set and
  // its list only (see below); [4] scans run here whose node lies closer than t to a window node (forced steps);
  // [5] the first of them (set it to -1: the walk writes it once). The
  // walk also returns when it reaches stop_step (-1: no stop), so that callers can report progress.
  m.def(
      "tfp_walk(Tensor embeddings, Tensor norms, Tensor band_index, Tensor band_s2, Tensor band_limit2, "
      "Tensor band_slack, Tensor num_close, Tensor scan_rows, Tensor scan_scale, Tensor scan_sq_norms, "
      "Tensor scan_slack, Tensor(a!) path, Tensor(b!) visited, "
      "Tensor(c!) counters, int step, int stop_step, float threshold, int window, int max_rejections, "
      "bool cosine, Tensor? group_of=None, Tensor? group_offsets=None, Tensor? group_members=None, "
      "Tensor(d!)? group_next=None, Tensor? long_row=None, Tensor? long_index=None, Tensor? long_s2=None, "
      "Tensor? long_slack=None, Tensor? close_offsets=None, Tensor? close_members=None, str policy='paper', "
      "Tensor[]? policy_groups=None) -> int");
  // policy (tfp_kernels/order/policy.py): "paper" (the rule above) or "spread" (no cap): a group of near-
  // duplicates that the window can barely keep apart (m unvisited members among u unvisited nodes, m >= 2 and
  // m (window + 1) >= u, t > 0) is urgent, and its lowest unvisited member is taken as soon as it is valid (the
  // urgent group with most members first, ties in the order (D[last, j], j)); a step where no unvisited node is
  // valid takes the node farthest from the window (max of the min distance to its nodes, ties: lower index).
  // policy_groups: [group_of (N,) int32 (-1: no duplicate), offsets (G + 1,) int64, members (M,) int64], the
  // groups of two or more near-duplicates (the caller's partition: tfp_kernels.order.policy.near_duplicate_groups)
  // numbered by decreasing size, members increasing (None: no such group).
  // Exact-duplicate groups (optional, all four or none): the band lists are then per group (U, K) and
  // hold group ids; group_of (N,) int32 is each node's group, group_members (N,) int64 the nodes of
  // group g in increasing order at group_offsets[g]..group_offsets[g + 1] (int64, U + 1), group_next
  // (U,) int64 the position of each group's first possibly-unvisited member (advanced by the walk). A
  // group's members have identical rows, so one distance stands for all and its next member is the
  // one the rule takes (ties by index).
  // Long lists (optional, all four or none): long_row (U,) int32 gives, per list row, a row of
  // long_index (L, K_long) int32 / long_s2 (L, K_long) float32 to read instead of the band tables (-1:
  // none); they are sorted band lists of the same meaning, long_slack (L,) float64 the error bound of
  // their s2 (band_limit2 holds their limit).
  // Close sets (optional, both or none; with the cap): close_members int32 holds, at
  // close_offsets[r]..close_offsets[r + 1] (int64, U + 1), nodes (visited or not) among which lie all nodes
  // closer than t to node r (empty: no set). Where the cap could fire by num_close, the walk counts the
  // set's unvisited members instead: a tighter bound on the unvisited nodes closer than t, so that fewer
  // steps need a scan; the scans run here at such steps pass over the set and the list of `last` only
  // (every node that may precede a pick nearer than the list's limit) when that decides.
  // Epilogue of the blockwise band top-k on the CPU: per row of a (B, N) float32 block of squared
  // distances (global rows row_offset..), the K smallest entries >= lower (by value, then column) and
  // the count of entries < upper, the row's own column skipped. Returns (index (B, K) int32, -1 padded;
  // s2 (B, K) float32, +inf padded; num_close (B,) int32). With row_sq (B,) and col_sq (N,) float32 the
  // block holds dot products and s2 = max((-2 dot + col_sq[j]) + row_sq[i], 0) is formed on the fly.
  m.def(
      "band_select(Tensor s2, int row_offset, Tensor lower, Tensor upper, int k, Tensor? row_sq=None, "
      "Tensor? col_sq=None) -> (Tensor, Tensor, Tensor)");
  // The same selection over the pairs of a block of dot products, each pair computed once: dot (B, C)
  // float32 holds the products of rows row0.. with rows col0.. (a diagonal block, row0 == col0, or one
  // off the diagonal, whose products also serve rows col0.. as the columns' side). Every row's K smallest
  // keys (s2 float bits << 32 | column) so far are kept in heap_keys (N, K) int64 (a max-heap of
  // heap_sizes[r] entries, int32) and its count below upper added to num_close (N,) int32; sq_norms,
  // lower, upper: (N,) float32. s2 of pair (r, c) is max((-2 dot + sq[c]) + sq[r], 0), as band_select forms
  // it for row r.
  m.def(
      "band_select_pairs(Tensor dot, int row0, int col0, Tensor sq_norms, Tensor lower, Tensor upper, "
      "Tensor(a!) heap_keys, Tensor(b!) heap_sizes, Tensor(c!) num_close) -> ()");
}

TORCH_LIBRARY_IMPL(tfp_kernels, CPU, m) {
  m.impl("next_fit_pack_ids", &tfp::next_fit_pack_ids_cpu);
  m.impl("best_fit_decreasing", &tfp::best_fit_decreasing_cpu);  // packing/assembly block
  m.impl("stream_pack", &tfp::stream_pack_cpu);  // packing/assembly block
  m.impl("fill_in_order", &tfp::fill_in_order_cpu);  // packing/assembly block
  m.impl("assemble", &tfp::assemble_cpu);  // packing/assembly block
  m.impl("tfp_walk", &tfp::tfp_walk_cpu);
  m.impl("band_select", &tfp::band_select_cpu);
  m.impl("band_select_pairs", &tfp::band_select_pairs_cpu);
}

#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(tfp_kernels, CUDA, m) {
  m.impl("next_fit_pack_ids", &tfp::next_fit_pack_ids_cuda);
  m.impl("assemble", &tfp::assemble_cuda);  // packing/assembly block
}
#endif

// A minimal Python module init, so that `import tfp_kernels._C` loads the library (and runs the
// registrations above) without pulling pybind11 into the build.
static struct PyModuleDef tfp_kernels_module = {PyModuleDef_HEAD_INIT, "_C", "tfp_kernels compiled ops", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tfp_kernels_module); }
