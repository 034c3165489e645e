// The packed-weight cache of weight_cache.h: host code only, no kernels, so
// the CPU build runs it too (tests reach it through
// _conv2d_relu_packed_weight on CPU tensors).
#include "conv/weight_cache.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <list>
#include <mutex>
#include <vector>

#include "common/dtype.h"
#include "common/op_utils.h"

namespace alexnet_ext {
namespace conv {
namespace {

// Packed tensors kept at most (all devices together).
constexpr int64_t kMaxBytes = int64_t(512) << 20;

using WeakTensorImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
using WeakStorageImpl = c10::weak_intrusive_ptr<c10::StorageImpl>;

// Everything a hit must match besides the packing. The raw pointers are
// compared while the entry holds weak references to both objects, which
// keeps their memory from being reused by another tensor or storage.
struct Identity {
  const c10::TensorImpl* impl = nullptr;
  const c10::StorageImpl* storage = nullptr;
  const void* data = nullptr;
  uint32_t version = 0;
  std::vector<int64_t> sizes, strides;
  c10::ScalarType dtype = c10::ScalarType::Undefined;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  int64_t stream = 0;
  bool operator==(const Identity& o) const {
    return impl == o.impl && storage == o.storage && data == o.data && version == o.version && sizes == o.sizes &&
           strides == o.strides && dtype == o.dtype && device == o.device && stream == o.stream;
  }
};

struct Entry {
  Entry(const at::Tensor& weight, Identity identity, const PackKey& pack_key, at::Tensor packed_weight)
      : impl_ref(weight.getIntrusivePtr()),
        storage_ref(weight.storage().getWeakStorageImpl()),
        id(std::move(identity)),
        key(pack_key),
        packed(std::move(packed_weight)),
        bytes(int64_t(packed.nbytes())) {}
  WeakTensorImpl impl_ref;
  WeakStorageImpl storage_ref;
  Identity id;
  PackKey key;
  at::Tensor packed;
  int64_t bytes;
};

struct Cache {
  std::mutex mutex;
  std::list<Entry> entries;  // most recently used first
  int64_t bytes = 0, hits = 0, misses = 0, skips = 0;
  bool enabled = true;

  Cache() {
    enabled = parse_env_flag(std::getenv("ALEXNET_EXT_CONV_WEIGHT_CACHE"));  // off unless set
  }
  void erase(std::list<Entry>::iterator it) {
    bytes -= it->bytes;
    entries.erase(it);
  }
  // Entries whose weight or storage died.
  void prune_dead() {
    for (auto it = entries.begin(); it != entries.end();) {
      auto next = std::next(it);
      if (it->impl_ref.expired() || it->storage_ref.expired()) erase(it);
      it = next;
    }
  }
  WeightCacheStats stats() const {
    return {enabled ? 1 : 0, hits, misses, skips, int64_t(entries.size()), bytes};
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: lookups may run during interpreter exit
  return *c;
}

// The identity of `w`, or false when it cannot be cached.
bool identify(const at::Tensor& w, Identity& id) {
  if (!w.defined() || !w.has_storage() || w.is_inference() || w.layout() != c10::kStrided) return false;
  // Another tensor on the same storage (a view, a `.data` alias such as
  // torch.autograd.gradcheck perturbs the weight through) may write it with
  // its own version counter.
  if (w.storage().use_count() > 1) return false;
  const c10::Device device = w.device();
  if (device.type() == c10::DeviceType::CUDA) {
    const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
#ifdef ALEXNET_EXT_WITH_CUDA
    if (cuda_stream_capturing(stream.native_handle())) return false;
#else
    return false;  // built without CUDA kernels: the CUDA path throws anyway
#endif
    id.stream = stream.id();
  }
  id.impl = w.unsafeGetTensorImpl();
  id.storage = w.storage().unsafeGetStorageImpl();
  id.data = w.const_data_ptr();
  id.version = w.unsafeGetTensorImpl()->version_counter().current_version();
  id.sizes = w.sizes().vec();
  id.strides = w.strides().vec();
  id.dtype = w.scalar_type();
  id.device = device;
  return true;
}

}  // namespace

at::Tensor cached_pack(const at::Tensor& weight, const PackKey& key, const std::function<at::Tensor()>& build) {
  Cache& c = cache();
  Identity id;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (!c.enabled || !identify(weight, id)) {
      ++c.skips;
      id.impl = nullptr;
    } else {
      c.prune_dead();
      for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
        if (it->id.impl != id.impl || !(it->key == key)) continue;
        if (it->id == id) {
          ++c.hits;
          c.entries.splice(c.entries.begin(), c.entries, it);
          return it->packed;
        }
        c.erase(it);  // the weight changed: this packing is stale
        break;
      }
    }
  }
  // Packed outside the lock: other threads' lookups need not wait for it.
  // Without autograd history: a grad_fn would hold the weight (through its
  // AccumulateGrad node) and keep a dead weight's entry alive.
  at::Tensor packed;
  {
    at::NoGradGuard no_grad;
    packed = build();
  }
  if (id.impl == nullptr) return packed;
  std::lock_guard<std::mutex> lock(c.mutex);
  // A packing that merely views the weight's storage saves no copy.
  if (packed.storage().is_alias_of(weight.storage())) {
    ++c.skips;
    return packed;
  }
  ++c.misses;
  if (!c.enabled) return packed;
  for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
    if (it->id.impl == id.impl && it->key == key) {  // another thread packed it meanwhile
      c.erase(it);
      break;
    }
  }
  c.entries.emplace_front(weight, std::move(id), key, packed);
  c.bytes += c.entries.front().bytes;
  while (c.bytes > kMaxBytes && c.entries.size() > 1) c.erase(std::prev(c.entries.end()));
  return packed;
}

void drop_packed(const at::Tensor& weight) {
  if (!weight.defined()) return;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  const c10::TensorImpl* impl = weight.unsafeGetTensorImpl();
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    auto next = std::next(it);
    if (it->id.impl == impl) c.erase(it);
    it = next;
  }
}

WeightCacheStats weight_cache_control(int64_t enable, bool clear) {
  TORCH_CHECK(enable >= -1 && enable <= 1, "alexnet_ext._conv2d_relu_weight_cache: `enable` must be -1, 0 or 1, got ",
              enable);
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (enable >= 0) c.enabled = enable == 1;
  if (clear || !c.enabled) {
    c.entries.clear();
    c.bytes = 0;
  }
  if (clear) c.hits = c.misses = c.skips = 0;
  c.prune_dead();
  return c.stats();
}

}  // namespace conv
}  // namespace alexnet_ext
