// CPU side of conv2d + bias + ReLU: the fused bias + ReLU pass over ATen's
// convolution output, the ReLU-gradient mask, and the loop reference of the
// implicit GEMMs the CUDA kernels run (see conv_math.h).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "conv/conv_cpu.h"

namespace alexnet_ext {
namespace conv {

void bias_relu_cpu(const at::Tensor& conv, const at::Tensor& bias, at::Tensor& out, at::MemoryFormat fmt) {
  const int64_t N = out.size(0), K = out.size(1), HW = out.numel() / std::max<int64_t>(1, N * K);
  const bool channels_last = fmt != at::MemoryFormat::Contiguous;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv2d_relu_bias_relu", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc* src = conv.const_data_ptr<acc>();
    const acc* b = bias.defined() ? bias.const_data_ptr<acc>() : nullptr;
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // One task per (n, channel plane) or (n, pixel row of channels).
    const int64_t rows = channels_last ? N * HW : N * K;
    const int64_t len = channels_last ? K : HW;
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, len)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t e = 0; e < len; ++e) {
          const int64_t k = channels_last ? e : r % K;
          const acc v = src[r * len + e] + (b ? b[k] : acc(0));
          dst[r * len + e] = static_cast<scalar_t>(relu(v));
        }
      }
    });
  });
}

void relu_grad_cpu(const at::Tensor& dy, const at::Tensor& y, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv2d_relu_mask", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    const scalar_t* v = y.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, out.numel(), 32768, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) o[i] = static_cast<scalar_t>(relu_grad<acc>(g[i], v[i]));
    });
  });
}

namespace {

// D[i][j] = sum_t A[i][t] B[t][j] for one pass and group, via the header's
// offsets; `d(i, j, sum)` stores a result.
template <typename scalar_t, typename acc, typename Store>
void gemm_loops(const ConvGeom& g, Pass pass, int grp, const scalar_t* a, const scalar_t* b, int64_t t0,
                int64_t t1, Store d) {
  const GemmDims dims = gemm_dims(g, pass);
  at::parallel_for(0, dims.M, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < dims.N; ++j) {
        acc sum = 0;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t ao = a_offset(g, pass, grp, i, t), bo = b_offset(g, pass, grp, t, j);
          if (ao >= 0 && bo >= 0) sum += static_cast<acc>(a[ao]) * static_cast<acc>(b[bo]);
        }
        d(i, j, sum);
      }
  });
}

}  // namespace

void gemm_reference_cpu(const ConvGeom& g, Pass pass, const at::Tensor& a, const at::Tensor& b,
                        const at::Tensor& bias, at::Tensor& d, int splits, int tile) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "conv2d_relu_gemm_reference", [&] {
    using acc = at::opmath_type<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    const scalar_t* biasp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    acc* dp = d.mutable_data_ptr<acc>();
    const GemmDims dims = gemm_dims(g, pass);
    for (int grp = 0; grp < g.groups; ++grp) {
      if (pass == Pass::Forward) {
        gemm_loops<scalar_t, acc>(g, pass, grp, ap, bp, 0, dims.Kred, [&](int64_t i, int64_t j, acc s) {
          const acc bj = biasp ? static_cast<acc>(biasp[grp * g.Kg + j]) : acc(0);
          dp[d_offset(g, pass, grp, i, j)] = relu(s + bj);
        });
        continue;
      }
      // Partial sums per split-K range (one range unless wgrad), then added
      // in split order as the CUDA reduction does.
      const int n_splits = pass == Pass::Wgrad ? splits : 1;
      std::vector<acc> partial(n_splits * dims.M * dims.N);
      for (int sp = 0; sp < n_splits; ++sp) {
        const Range range = split_range(dims.Kred, tile, sp, n_splits);
        gemm_loops<scalar_t, acc>(g, pass, grp, ap, bp, range.begin, range.end, [&](int64_t i, int64_t j, acc s) {
          partial[(sp * dims.M + i) * dims.N + j] = s;
        });
      }
      for (int64_t i = 0; i < dims.M; ++i)
        for (int64_t j = 0; j < dims.N; ++j) {
          acc s = 0;
          for (int sp = 0; sp < n_splits; ++sp) s += partial[(sp * dims.M + i) * dims.N + j];
          dp[d_offset(g, pass, grp, i, j)] = s;
        }
    }
  });
}

void col2im_reference_cpu(const ConvGeom& g, const at::Tensor& cols, at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES(dx.scalar_type(), "conv2d_relu_col2im_reference", [&] {
    const scalar_t* c = cols.const_data_ptr<scalar_t>();
    scalar_t* out = dx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, int64_t(g.N) * g.H * g.W, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        const Pixel px = split_pixel(m, g.div.HW, g.div.W);
        for (int ch = 0; ch < g.C; ++ch) out[m * g.C + ch] = col2im_sum(g, c, px.n, ch, px.a, px.b);
      }
    });
  });
}

}  // namespace conv
}  // namespace alexnet_ext
