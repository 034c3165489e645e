// LRN on the CPU: parallel over (N x blocks of pixels); each task copies the
// squares of its block for all channels into a small buffer (kept in cache),
// then takes the window sums along channels directly.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "lrn/lrn_cpu.h"
#include "lrn/lrn_math.h"

namespace alexnet_ext {
namespace lrn {
namespace {

constexpr int64_t kPixelBlock = 64;

// Index helper for the (N, C, P) view in either layout.
struct Layout {
  int64_t C, P;
  bool channels_last;
  int64_t offset(int64_t n, int64_t c, int64_t p) const {
    return channels_last ? (n * P + p) * C + c : (n * C + c) * P + p;
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

// Runs fn(n, p0, B) over all pixel blocks in parallel.
template <typename Fn>
void for_each_block(const LrnParams& p, Fn fn) {
  const int64_t blocks_per_image = (p.inner + kPixelBlock - 1) / kPixelBlock;
  const int64_t tasks = p.outer * blocks_per_image;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, p.channels * kPixelBlock));
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks_per_image;
      const int64_t p0 = (t % blocks_per_image) * kPixelBlock;
      fn(n, p0, std::min(kPixelBlock, p.inner - p0));
    }
  });
}

template <typename scalar_t>
void forward_impl(const scalar_t* x, scalar_t* y, const LrnParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = make_coefs<acc>(p);
  const Layout L{p.channels, p.inner, p.channels_last};
  const int64_t C = p.channels;
  for_each_block(p, [&](int64_t n, int64_t p0, int64_t B) {
    std::vector<acc> sq(C * B), sums(C * B);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < B; ++b) {
        const acc v = static_cast<acc>(x[L.offset(n, c, p0 + b)]);
        sq[c * B + b] = v * v;
      }
    window_sums(sq.data(), sums.data(), C, B, window_before(p.size), window_after(p.size));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = L.offset(n, c, p0 + b);
        const acc s = denominator_base(sums[c * B + b], coefs);
        y[o] = static_cast<scalar_t>(static_cast<acc>(x[o]) * inv_pow(s, coefs));
      }
  });
}

template <typename scalar_t>
void backward_impl(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const LrnParams& p) {
  using acc = at::opmath_type<scalar_t>;
  const Coefs<acc> coefs = make_coefs<acc>(p);
  const Layout L{p.channels, p.inner, p.channels_last};
  const int64_t C = p.channels;
  for_each_block(p, [&](int64_t n, int64_t p0, int64_t B) {
    std::vector<acc> sq(C * B), s(C * B), t(C * B), t_sums(C * B);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < B; ++b) {
        const acc v = static_cast<acc>(x[L.offset(n, c, p0 + b)]);
        sq[c * B + b] = v * v;
      }
    window_sums(sq.data(), s.data(), C, B, window_before(p.size), window_after(p.size));
    // s becomes the denominator base, sq is reused for s^-beta.
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t i = c * B + b;
        const int64_t o = L.offset(n, c, p0 + b);
        s[i] = denominator_base(s[i], coefs);
        sq[i] = inv_pow(s[i], coefs);
        t[i] = grad_term(static_cast<acc>(dy[o]), static_cast<acc>(x[o]), sq[i], s[i]);
      }
    // dx needs t summed over R(i) = [i - after, i + before]: the mirrored window.
    window_sums(t.data(), t_sums.data(), C, B, window_after(p.size), window_before(p.size));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t i = c * B + b;
        const int64_t o = L.offset(n, c, p0 + b);
        dx[o] = static_cast<scalar_t>(grad_input(static_cast<acc>(dy[o]), static_cast<acc>(x[o]), sq[i],
                                                 t_sums[i], coefs));
      }
  });
}

}  // namespace

void lrn_forward_cpu(const at::Tensor& x, at::Tensor& y, const LrnParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_forward_cpu", [&] {
    forward_impl<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), p);
  });
}

void lrn_backward_cpu(const at::Tensor& dy, const at::Tensor& x, at::Tensor& dx, const LrnParams& p) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_backward_cpu", [&] {
    backward_impl<scalar_t>(dy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                            dx.mutable_data_ptr<scalar_t>(), p);
  });
}

}  // namespace lrn
}  // namespace alexnet_ext
