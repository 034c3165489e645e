// LRN on the CPU: parallel over (N x blocks of pixels); each task copies the
// squares of its block for all channels into a small buffer (kept in cache),
// then takes the window sums along channels directly. NCHW blocks run
// compiled for AVX-512/AVX2 where the CPU has them (common/cpu_isa.h): their
// loops are over contiguous pixels, and the rsqrt/sqrt of every element
// vectorise. channels_last visits the (C, B) buffers with a stride, which
// the wider ISAs turn into slow gathers, so it stays as compiled.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/cpu_isa.h"
#include "lrn/lrn_cpu.h"
#include "lrn/lrn_math.h"

namespace alexnet_ext {
namespace lrn {
namespace {

constexpr int64_t kPixelBlock = 64;

// One task's block of B pixels of image n, all C channels. The layout is a
// template parameter so the inner loops run over unit strides: pixels for
// NCHW, channels for channels_last. Buffers are (C, B) row-major.
template <bool kChannelsLast>
struct Block {
  int64_t C, P, n, p0, B;
  int64_t base() const { return kChannelsLast ? (n * P + p0) * C : n * C * P + p0; }

  // buf[c*B + b] = f(src[c, b]), walking memory in order.
  template <typename scalar_t, typename acc, typename Fn>
  void gather(const scalar_t* src, acc* buf, Fn f) const {
    src += base();
    if (kChannelsLast) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) buf[c * B + b] = f(static_cast<acc>(src[b * C + c]));
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t b = 0; b < B; ++b) buf[c * B + b] = f(static_cast<acc>(src[c * P + b]));
    }
  }

  // Calls f(buffer index c*B + b, tensor offset of (c, b)), walking memory in order.
  template <typename Fn>
  void visit(Fn f) const {
    const int64_t o = base();
    if (kChannelsLast) {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < C; ++c) f(c * B + b, o + b * C + c);
    } else {
      for (int64_t c = 0; c < C; ++c)
        for (int64_t b = 0; b < B; ++b) f(c * B + b, o + c * P + b);
    }
  }
};

// out[c*B + b] = sum of in[j*B + b] over j in [c - before, c + after] ∩ [0, C).
template <typename acc>
void window_sums(const acc* in, acc* out, int64_t C, int64_t B, int before, int after) {
  for (int64_t c = 0; c < C; ++c) {
    acc* o = out + c * B;
    for (int64_t b = 0; b < B; ++b) o[b] = acc(0);
    const int64_t lo = std::max<int64_t>(0, c - before);
    const int64_t hi = std::min<int64_t>(C - 1, c + after);
    for (int64_t j = lo; j <= hi; ++j) {
      const acc* row = in + j * B;
      for (int64_t b = 0; b < B; ++b) o[b] += row[b];
    }
  }
}

// Runs fn(block, buffers) over all pixel blocks in parallel; each thread
// allocates its `n_buffers` (C, kPixelBlock) buffers once.
template <bool kChannelsLast, typename acc, typename Fn>
void for_each_block(const LrnParams& p, int n_buffers, Fn fn) {
  const int64_t blocks_per_image = (p.inner + kPixelBlock - 1) / kPixelBlock;
  const int64_t tasks = p.outer * blocks_per_image;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.channels * kPixelBlock));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc> storage(static_cast<size_t>(n_buffers * p.channels * kPixelBlock));
    for (int64_t t = begin; t < end; ++t) {
      Block<kChannelsLast> blk;
      blk.C = p.channels;
      blk.P = p.inner;
      blk.n = t / blocks_per_image;
      blk.p0 = (t % blocks_per_image) * kPixelBlock;
      blk.B = std::min(kPixelBlock, p.inner - blk.p0);
      if constexpr (kChannelsLast) {
        fn(blk, storage.data());
      } else {
        with_cpu_isa([&] { fn(blk, storage.data()); });
      }
    }
  });
}

template <typename scalar_t, bool kChannelsLast>
void forward_impl(const scalar_t* x, scalar_t* y, const LrnParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = make_coefs<acc>(p);
  for_each_block<kChannelsLast, acc>(p, 2, [&](const Block<kChannelsLast>& blk, acc* buf) {
    const int64_t n_elem = blk.C * blk.B;
    acc* sq = buf;
    acc* sums = buf + n_elem;
    blk.gather(x, sq, [](acc v) { return v * v; });
    window_sums(sq, sums, blk.C, blk.B, window_before(p.size), window_after(p.size));
    blk.visit([&](int64_t i, int64_t o) {
      y[o] = static_cast<scalar_t>(static_cast<acc>(x[o]) * inv_pow(denominator_base(sums[i], coefs), coefs));
    });
  });
}

template <typename scalar_t, bool kChannelsLast>
void backward_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const LrnParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = make_coefs<acc>(p);
  for_each_block<kChannelsLast, acc>(p, 3, [&](const Block<kChannelsLast>& blk, acc* buf) {
    const int64_t n_elem = blk.C * blk.B;
    acc* a = buf;               // x^2, then t
    acc* s = buf + n_elem;      // window sums of x^2, then dy * s^-beta
    acc* t_sums = buf + 2 * n_elem;
    blk.gather(x, a, [](acc v) { return v * v; });
    window_sums(a, s, blk.C, blk.B, window_before(p.size), window_after(p.size));
    blk.visit([&](int64_t i, int64_t o) {
      const acc base = denominator_base(s[i], coefs);
      const acc ip = inv_pow(base, coefs);
      const acc dyv = static_cast<acc>(dy[o]);
      a[i] = grad_term(dyv, static_cast<acc>(x[o]), ip, base);
      s[i] = dyv * ip;
    });
    // dx needs t summed over R(i) = [i - after, i + before]: the mirrored window.
    window_sums(a, t_sums, blk.C, blk.B, window_after(p.size), window_before(p.size));
    blk.visit([&](int64_t i, int64_t o) {
      dx[o] = static_cast<scalar_t>(grad_input(s[i], static_cast<acc>(x[o]), t_sums[i], coefs));
    });
  });
}

}  // namespace

void lrn_forward_cpu(const at::Tensor& x, at::Tensor& y, const LrnParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_forward_cpu", [&] {
    if (p.channels_last) {
      forward_impl<scalar_t, true>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), p);
    } else {
      forward_impl<scalar_t, false>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), p);
    }
  });
}

void lrn_backward_cpu(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, const LrnParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_backward_cpu", [&] {
    const auto* dyp = dy.const_data_ptr<scalar_t>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    auto* dxp = dx.mutable_data_ptr<scalar_t>();
    if (p.channels_last) {
      backward_impl<scalar_t, true>(dyp, xp, dxp, p);
    } else {
      backward_impl<scalar_t, false>(dyp, xp, dxp, p);
    }
  });
}

}  // namespace lrn
}  // namespace alexnet_ext
