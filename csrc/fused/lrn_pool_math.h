// Fused cross-channel LRN + max-pool: max_pool2d(local_response_norm(x)).
// The arithmetic is lrn/lrn_math.h's and maxpool/pool_math.h's; this header
// only ties one call's parameters together and names the one composite
// step both backends share.
//
// Forward: the pool takes its maximum over LRN outputs rounded to the
// tensor's dtype, exactly the values the unfused pair writes and pools, so
// the argmax (ties, NaN) is the unfused pair's.
// Backward: d loss / d lrn_out is the pool's scatter of grad_out through the
// argmax; it is never stored, and the LRN backward formula takes it from
// there (recomputing the denominators from the input, nothing saved).
#pragma once
#include "common/host_device.h"
#include "lrn/lrn_math.h"
#include "maxpool/pool_math.h"

namespace alexnet_ext {
namespace fused {

// One call. lrn.inner is H * W; pool.channels_last == lrn.channels_last.
struct LrnPoolParams {
  lrn::LrnParams lrn;
  pool::PoolGeometry pool;
};

// y = x * s^-beta with s from the window's sum of squares (not yet rounded).
template <typename acc>
AX_HD acc lrn_output(acc x, acc window_sum_sq, const lrn::Coefs<acc>& c) {
  return x * lrn::inv_pow(lrn::denominator_base(window_sum_sq, c), c);
}

}  // namespace fused
}  // namespace alexnet_ext
