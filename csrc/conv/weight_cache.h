// A cache of packed conv weights (forward KRSC or folded, dgrad's wt): the
// CUDA path repacks the weight on every call otherwise, though weights do
// not change between evaluation calls. Off unless enabled
// (ALEXNET_EXT_CONV_WEIGHT_CACHE=1 or
// torch.ops.alexnet_ext._conv2d_relu_weight_cache(1)), because a cache
// keyed by the version counter cannot see writes that bypass it.
//
// A hit needs the same live TensorImpl, the same version counter value, the
// same storage, data pointer, sizes, strides, dtype, device and stream, and
// the same packing. Entries hold weak references only (a dead weight's
// entry is dropped at the next lookup), at most kMaxBytes of packed tensors
// (least recently used dropped first).
// Writes the version counter does not see: through `.data` (an alias with
// its own counter), fused optimizers (`torch.optim.Adam(fused=True)` leaves
// `_version` unchanged on torch 2.13), numpy/DLPack aliases. Two guards:
// a weight whose storage another tensor shares (a view, a live `.data`
// alias: torch.autograd.gradcheck perturbs inputs that way) is not cached;
// the backward that computes a weight's gradient drops that weight's
// entries, so whatever the optimizer then does, the next forward repacks.
// What stays unseen, and why the cache is opt-in: a `.data` (or numpy)
// write between two forwards with no such backward in between, e.g.
// `p.data.copy_(pretrained)` after an evaluation, or an EMA copy updated
// through `.data`.
// Not cached: inference tensors (no version counter), tensors without
// storage, and while the CUDA stream is capturing a graph (a graph must read
// the weight itself, and a cached buffer could be freed before a replay).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>

namespace alexnet_ext {
namespace conv {

enum class PackKind : int { Krsc = 0, Folded = 1, Dgrad = 2 };

// The packing and the padded geometry it was built for.
struct PackKey {
  PackKind kind = PackKind::Krsc;
  std::array<int64_t, 3> params{};
  bool operator==(const PackKey& o) const { return kind == o.kind && params == o.params; }
};

// [enabled, hits, misses, skips (not cacheable), entries, bytes]
using WeightCacheStats = std::array<int64_t, 6>;

// `build()` packs `weight`; its result is returned (and kept) on a miss, the
// kept tensor on a hit. Thread-safe.
at::Tensor cached_pack(const at::Tensor& weight, const PackKey& key, const std::function<at::Tensor()>& build);
// Drops every entry of `weight` (its gradient was just computed).
void drop_packed(const at::Tensor& weight);
// enable: 1 on, 0 off (also drops every entry), -1 unchanged; clear: drop
// every entry and zero the counters. Returns the stats after.
WeightCacheStats weight_cache_control(int64_t enable, bool clear);

}  // namespace conv
}  // namespace alexnet_ext
