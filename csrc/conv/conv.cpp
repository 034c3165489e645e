// conv2d + bias + ReLU operators: schemas, argument checks, layouts and the
// CPU/CUDA registrations.
//
// CPU: ATen's convolution in the accumulation dtype, then bias + ReLU (and
// the rounding to the output dtype) in one pass; backward masks dy with
// relu_grad(dy, y) and calls ATen's convolution_backward.
// CUDA: the implicit GEMMs of conv_math.h on NHWC operands; NCHW tensors are
// converted to channels_last here and the results copied back (except dy and
// y, which the backward's preparation pass reads where they lie); packed
// weights are cached (weight_cache.h).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>

#include "common/op_utils.h"
#include "conv/conv_cpu.h"
#include "conv/conv_cuda.h"
#include "conv/weight_cache.h"

namespace alexnet_ext {
namespace conv {
namespace {

constexpr const char* kOp = "alexnet_ext.conv2d_relu";
constexpr const char* kOpBackward = "alexnet_ext.conv2d_relu backward";

void check_pair(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, kOp, ": `", name, "` must have 2 elements, got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, kOp, ": `", name, "` must be >= ", min, ", got ", v);
  TORCH_CHECK(v[0] < (1 << 20) && v[1] < (1 << 20), kOp, ": `", name, "` is too large: ", v);
}

// Checks every argument and returns the geometry (unpadded channels).
ConvGeom check_and_geometry(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups) {
  check_float_tensor(input, "input");
  check_float_tensor(weight, "weight");
  TORCH_CHECK(input.dim() == 4, kOp, ": `input` must be 4-D (N, C, H, W), got shape ", input.sizes());
  TORCH_CHECK(weight.dim() == 4, kOp, ": `weight` must be 4-D (K, C/groups, R, S), got shape ", weight.sizes());
  check_same_device_dtype(weight, "weight", input, "input");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  TORCH_CHECK(groups >= 1, kOp, ": `groups` must be >= 1, got ", groups);
  const int64_t C = input.size(1), K = weight.size(0);
  TORCH_CHECK(C % groups == 0, kOp, ": `input` has ", C, " channels, not divisible by `groups` = ", groups);
  TORCH_CHECK(K % groups == 0, kOp, ": `weight` has ", K, " output channels, not divisible by `groups` = ", groups);
  TORCH_CHECK(weight.size(1) * groups == C, kOp, ": `weight` of shape ", weight.sizes(), " with `groups` = ", groups,
              " expects ", weight.size(1) * groups, " input channels, but `input` has ", C);
  TORCH_CHECK(K >= 1 && weight.size(1) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1, kOp, ": `weight` must not be empty, got shape ",
              weight.sizes());
  if (bias.has_value() && bias->defined()) {
    check_float_tensor(*bias, "bias");
    check_same_device_dtype(*bias, "bias", input, "input");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K, kOp, ": `bias` must have shape (", K, "), got ",
                bias->sizes());
  }
  const int64_t H = input.size(2), W = input.size(3), R = weight.size(2), S = weight.size(3);
  // An empty plane padded into a non-empty output has nothing to convolve
  // (PyTorch rejects it too); an empty batch is a valid, empty call.
  TORCH_CHECK((H > 0 && W > 0) || input.size(0) == 0, kOp, ": `input` must have a non-zero height and width ",
              "unless the batch is empty, got shape ", input.sizes());
  TORCH_CHECK(H + 2 * padding[0] >= R && W + 2 * padding[1] >= S, kOp, ": `input` spatial size (", H, ", ", W,
              ") plus `padding` ", padding, " is smaller than the kernel (", R, ", ", S, ")");
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  TORCH_CHECK(H < (1 << 30) && W < (1 << 30) && C <= kMaxInt && input.size(0) <= kMaxInt && K <= kMaxInt, kOp,
              ": `input`/`weight` sizes must fit in 32 bits, got ", input.sizes(), " and ", weight.sizes());
  ConvGeom g;
  g.N = int(input.size(0));
  g.C = int(C);
  g.H = int(H);
  g.W = int(W);
  g.K = int(K);
  g.R = int(R);
  g.S = int(S);
  g.stride_h = int(stride[0]);
  g.stride_w = int(stride[1]);
  g.pad_h = int(padding[0]);
  g.pad_w = int(padding[1]);
  g.P = conv_out_size(g.H, g.R, g.stride_h, g.pad_h);
  g.Q = conv_out_size(g.W, g.S, g.stride_w, g.pad_w);
  g.groups = int(groups);
  g.Cg = int(C / groups);
  g.Kg = int(K / groups);
  return with_divisors(g);
}

// The implicit-GEMM index math (conv_math.h) splits pixel and tap indices
// in 32 bits (offsets are 64-bit): the CUDA kernels and the reference need
// fewer than 2^31 input pixels, output pixels and taps.
void check_gemm_indexing(const ConvGeom& g, int64_t vec) {
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  const int64_t taps = int64_t(g.R) * g.S * ((std::max(g.Cg, g.Kg) + vec - 1) / vec * vec);
  TORCH_CHECK(int64_t(g.N) * g.H * g.W <= kMaxInt && int64_t(g.N) * g.P * g.Q <= kMaxInt && taps <= kMaxInt, kOp,
              ": inputs or outputs with 2^31 or more pixels (N*H*W = ", int64_t(g.N) * g.H * g.W,
              ") are not supported on CUDA; split the batch");
}

std::vector<int64_t> output_sizes(const ConvGeom& g) { return {g.N, g.K, g.P, g.Q}; }

// Whether the CUDA kernels run a `dtype` convolution on TF32 tensor cores:
// only float32 can, and it follows PyTorch's convolution-specific setting,
// the one cuDNN convolutions obey: torch.backends.cudnn.conv.fp32_precision
// ("tf32" or "ieee"), which the legacy torch.backends.cudnn.allow_tf32 also
// sets. The no-argument allowTF32CuDNN() must not be used: it throws once
// conv and RNN precisions differ (PyTorch 2.9+), which would fail every
// CUDA conv whatever its dtype.
bool conv_uses_tf32(at::ScalarType dtype) {
  return dtype == at::kFloat && at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
}

// ---------------------------------------------------------------------------
// Operand preparation shared by the CUDA path and the GEMM reference:
// channels-last operands with the channels of every group padded with zeros
// to a multiple of `vec` (16 bytes of the element type on CUDA).

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// (..., G*c) -> (..., G*c_pad): zero channels appended to every group.
at::Tensor pad_groups_last(const at::Tensor& t, int64_t groups, int64_t c_pad) {
  const int64_t c = t.size(-1) / groups;
  if (c == c_pad) return t.contiguous();
  std::vector<int64_t> split(t.sizes().begin(), t.sizes().end() - 1);
  split.push_back(groups);
  split.push_back(c);
  std::vector<int64_t> merged(t.sizes().begin(), t.sizes().end() - 1);
  merged.push_back(groups * c_pad);
  return at::constant_pad_nd(t.reshape(split), {0, c_pad - c}).reshape(merged).contiguous();
}

// NCHW-indexed tensor -> contiguous NHWC with padded group channels.
at::Tensor to_nhwc(const at::Tensor& t, int64_t groups, int64_t c_pad) {
  return pad_groups_last(t.permute({0, 2, 3, 1}), groups, c_pad);
}

struct Operands {
  ConvGeom g;       // padded geometry (C = G*Cg, K = G*Kg with padded Cg, Kg)
  ConvGeom orig;    // the caller's geometry
};

Operands padded_geometry(const ConvGeom& orig, int64_t vec) {
  Operands o{orig, orig};
  o.g.Cg = int(round_up(orig.Cg, vec));
  o.g.Kg = int(round_up(orig.Kg, vec));
  o.g.C = o.g.Cg * orig.groups;
  o.g.K = o.g.Kg * orig.groups;
  o.g = with_divisors(o.g);
  return o;
}

// Whether forward and wgrad fold (filter column, channel) into one run
// (ConvGeom::fold): for few channels per group, where padding C to the
// 16-byte vector would multiply the MMA work (conv1: C = 3 -> 8), on the
// tensor-core path, when every run starts kFoldVec-aligned (stride_w * C a
// multiple of kFoldVec) and the folded reduction is the shorter one.
bool use_fold(const ConvGeom& orig, int64_t vec, bool mma) {
  if (!mma || orig.groups != 1 || orig.Cg % vec == 0 || (int64_t(orig.stride_w) * orig.C) % kFoldVec != 0) {
    return false;
  }
  const int64_t fold = round_up(int64_t(orig.S) * orig.C, kFoldVec);
  return fold < int64_t(orig.S) * round_up(orig.C, vec);
}

// The folded geometry of `o` (channels unpadded, K padded as in o.g): x is
// stored (N, H, W', C) with the horizontal padding included and W' * C a
// multiple of kFoldVec, so every run starts aligned.
ConvGeom folded_geometry(const Operands& o) {
  ConvGeom f = o.g;
  f.C = f.Cg = o.orig.C;
  int64_t width = int64_t(o.orig.W) + 2 * o.orig.pad_w;
  while (width * f.C % kFoldVec != 0) ++width;
  f.W = int(width);
  f.pad_w = 0;
  f.fold = int(round_up(int64_t(f.S) * f.C, kFoldVec));
  return with_divisors(f);
}

// NCHW-indexed input -> folded x (N, H, W', C).
at::Tensor x_folded(const at::Tensor& input, const ConvGeom& f, const ConvGeom& orig) {
  return at::constant_pad_nd(input.permute({0, 2, 3, 1}), {0, 0, orig.pad_w, f.W - orig.W - orig.pad_w})
      .contiguous();
}

// weight (K, C, R, S) -> folded (K', R * fold): wf[k][r*fold + s*C + c].
at::Tensor weight_folded(const at::Tensor& weight, const ConvGeom& f, const ConvGeom& orig) {
  const int64_t run = int64_t(f.S) * f.C;
  at::Tensor w = weight.permute({0, 2, 3, 1}).reshape({orig.K, f.R, run});
  w = at::constant_pad_nd(w, {0, f.fold - run, 0, 0, 0, f.Kg - orig.K});
  return w.reshape({f.Kg, int64_t(f.R) * f.fold}).contiguous();
}

// folded (K', R * fold) -> (K, C, R, S) view.
at::Tensor unfold_weight(const at::Tensor& wf, const ConvGeom& f, const ConvGeom& orig) {
  return wf.narrow(0, 0, orig.K)
      .reshape({orig.K, f.R, f.fold})
      .narrow(2, 0, int64_t(f.S) * f.C)
      .reshape({orig.K, f.R, f.S, f.C})
      .permute({0, 3, 1, 2});
}

// weight (K, Cg, R, S) -> padded KRSC (G*Kg', R, S, Cg').
at::Tensor weight_krsc(const at::Tensor& weight, const Operands& o) {
  const ConvGeom& g = o.g;
  at::Tensor w = pad_groups_last(weight.permute({0, 2, 3, 1}), 1, g.Cg);   // (K, R, S, Cg')
  w = w.reshape({g.groups, o.orig.Kg, g.R * g.S * g.Cg});
  return at::constant_pad_nd(w, {0, 0, 0, g.Kg - o.orig.Kg}).reshape({g.K, g.R, g.S, g.Cg}).contiguous();
}

// padded KRSC -> wt (G, Cg', R, S, Kg') for dgrad.
at::Tensor weight_for_dgrad(const at::Tensor& w_krsc, const ConvGeom& g) {
  return w_krsc.reshape({g.groups, g.Kg, g.R, g.S, g.Cg}).permute({0, 4, 2, 3, 1}).contiguous();
}

// The geometry of the strided dgrad's columns GEMM (Pass::DgradCols): dy's
// channels padded as in o.g (its vectors run along k), the input channels
// unpadded (they are the GEMM's N side, copied one row at a time).
ConvGeom columns_geometry(const Operands& o) {
  ConvGeom gc = o.g;
  gc.C = o.orig.C;
  gc.Cg = o.orig.Cg;
  gc.fold = 0;
  return with_divisors(gc);
}

// weight (K, Cg, R, S) -> wc (G, R, S, Cg, Kg'): the columns GEMM's B, its
// reduction index (the group's output channel) innermost.
at::Tensor weight_for_columns(const at::Tensor& weight, const ConvGeom& gc, const ConvGeom& orig) {
  at::Tensor w = weight.reshape({gc.groups, orig.Kg, gc.Cg, gc.R, gc.S}).permute({0, 3, 4, 2, 1});
  return at::constant_pad_nd(w, {0, gc.Kg - orig.Kg}).contiguous();
}

// Bytes of float32/64 columns one launch of the columns GEMM may write: the
// batch is split into chunks of whole images under this bound (conv1 at
// 64 MiB: 15 of 128 images, 4.4 MB of float32 columns each, 9 launches).
// Settable for tests (_conv2d_relu_columns_limit, returns the previous
// bound): a small one makes small problems run several chunks, 0 turns the
// columns path off (the direct strided dgrad stays tested).
std::atomic<int64_t> g_columns_limit{int64_t(64) << 20};
int64_t set_columns_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, kOp, ": `bytes` must be >= 0, got ", bytes);
  return g_columns_limit.exchange(bytes);
}

// Images per chunk of the columns workspace (at least one).
int64_t columns_chunk(const ConvGeom& gc, int64_t acc_bytes) {
  const int64_t per_image = int64_t(gc.P) * gc.Q * gc.groups * gc.R * gc.S * gc.Cg * acc_bytes;
  return std::clamp<int64_t>(g_columns_limit.load() / std::max<int64_t>(1, per_image), 1, std::max(1, gc.N));
}

// Whether dgrad runs as the columns GEMM + col2im gather instead of the
// direct (zero-tap) GEMM: for strides > 1 where it executes fewer
// multiply-adds (conv1: 1.06x the useful work instead of 177x). Stride 1
// keeps the direct kernels: no zero taps, and no columns to write and read.
bool use_dgrad_columns(const Operands& o, DType dt, bool allow_tf32) {
  if (int64_t(o.orig.stride_h) * o.orig.stride_w == 1 || g_columns_limit.load() == 0) return false;
  GemmLaunch direct, cols;
  direct.allow_tf32 = cols.allow_tf32 = allow_tf32;
  direct.g = o.g;
  direct.pass = Pass::Dgrad;
  cols.g = columns_geometry(o);
  cols.pass = Pass::DgradCols;
  return planned_macs(plan_gemm(dt, cols)) < planned_macs(plan_gemm(dt, direct));
}

// (N, A, B, G*c_pad) -> NCHW-indexed view with the caller's channels.
at::Tensor unpad_nhwc(const at::Tensor& t, int64_t groups, int64_t c_pad, int64_t c) {
  at::Tensor v = t.reshape({t.size(0), t.size(1), t.size(2), groups, c_pad});
  if (c != c_pad) v = v.narrow(4, 0, c);
  return v.reshape({t.size(0), t.size(1), t.size(2), groups * c}).permute({0, 3, 1, 2});
}

// padded KRSC-shaped (G*Kg', R, S, Cg') -> (K, Cg, R, S) view.
at::Tensor unpad_krsc(const at::Tensor& t, const Operands& o) {
  const ConvGeom& g = o.g;
  at::Tensor v = t.reshape({g.groups, g.Kg, g.R, g.S, g.Cg}).narrow(1, 0, o.orig.Kg).narrow(4, 0, o.orig.Cg);
  return v.reshape({o.orig.K, g.R, g.S, o.orig.Cg}).permute({0, 3, 1, 2});
}

// The packed weight of `kind` for these operands, through the cache of
// weight_cache.h: rebuilt only when the weight changed. dgrad's wt is built
// from the (cached) KRSC packing, which the forward usually left there.
at::Tensor packed_weight(const at::Tensor& weight, const Operands& o, PackKind kind) {
  const ConvGeom& g = o.g;
  if (kind == PackKind::Folded) {
    const ConvGeom f = folded_geometry(o);
    return cached_pack(weight, {kind, {f.fold, f.Kg, 0}}, [&] { return weight_folded(weight, f, o.orig); });
  }
  const PackKey key{kind, {g.groups, g.Cg, g.Kg}};
  if (kind == PackKind::Krsc) return cached_pack(weight, key, [&] { return weight_krsc(weight, o); });
  return cached_pack(weight, key, [&] { return weight_for_dgrad(packed_weight(weight, o, PackKind::Krsc), g); });
}

// Drops the weight's cached packings when it goes out of scope, if its
// gradient was computed: the optimizer step that usually follows may change
// the weight without bumping its version counter (fused optimizers, `.data`).
struct DropPackedOnExit {
  const at::Tensor& weight;
  bool drop;
  ~DropPackedOnExit() {
    if (drop) drop_packed(weight);
  }
};

// Test hook (_conv2d_relu_packed_weight): the packing the CUDA path uses
// (kind 0: forward KRSC, 1: forward folded, 2: dgrad's wt) of a weight for
// `groups` and channel vectors of `vec` elements, through the cache, on any
// device (so the CPU tests exercise the cache).
at::Tensor packed_weight_hook(const at::Tensor& weight, int64_t groups, int64_t vec, int64_t kind) {
  check_float_tensor(weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.numel() > 0, kOp, " packed weight: `weight` must be a non-empty 4-D tensor, got ",
              weight.sizes());
  TORCH_CHECK(groups >= 1 && weight.size(0) % groups == 0, kOp, " packed weight: `groups` = ", groups,
              " must divide the ", weight.size(0), " output channels");
  TORCH_CHECK(vec >= 1, kOp, " packed weight: `vec` must be >= 1, got ", vec);
  TORCH_CHECK(kind >= 0 && kind <= 2, kOp, " packed weight: `kind` must be 0 (KRSC), 1 (folded) or 2 (dgrad), got ", kind);
  TORCH_CHECK(kind != 1 || groups == 1, kOp, " packed weight: the folded packing needs `groups` = 1");
  ConvGeom orig{};
  orig.N = 1;
  orig.K = int(weight.size(0));
  orig.Cg = int(weight.size(1));
  orig.C = orig.Cg * int(groups);
  orig.R = orig.H = int(weight.size(2));
  orig.S = orig.W = int(weight.size(3));
  orig.P = orig.Q = 1;
  orig.stride_h = orig.stride_w = 1;
  orig.groups = int(groups);
  orig.Kg = orig.K / int(groups);
  // A new tensor object: autograd's fallback for this op attaches history
  // to what it returns, and the cache's own tensor must stay without it.
  return packed_weight(weight, padded_geometry(with_divisors(orig), vec), static_cast<PackKind>(kind)).detach();
}

std::vector<int64_t> weight_cache_hook(int64_t enable, bool clear) {
  const WeightCacheStats s = weight_cache_control(enable, clear);
  return {s.begin(), s.end()};
}

// Test hook (_conv2d_relu_force_variant): the tensor-core tile variant every
// CUDA launch of a matching kind uses, -1 for the plan's choice. Lets the
// tests run tiles the plan picks only for shapes too large for the emulator.
std::atomic<int> g_force_variant{-1};
void force_variant(int64_t v) { g_force_variant.store(int(v)); }

// Split-K count for wgrad: enough blocks of the planned tile for two full
// waves (conv_cuda.h's kFillWaves at the tile's residency), each split
// still reducing over at least 1024 output pixels.
int wgrad_splits(const ConvGeom& g, DType dtype, bool allow_tf32) {
  GemmLaunch p;
  p.g = g;
  p.pass = Pass::Wgrad;
  p.allow_tf32 = allow_tf32;
  const GemmPlan pl = plan_gemm(dtype, p);
  const int64_t resident = pl.mma && pl.variant >= 0 ? resident_blocks(kMmaVariants[pl.variant], dtype) : 2;
  const int64_t target = kFillWaves * kSms * resident;
  const int64_t blocks = std::max<int64_t>(1, pl.grid_x * pl.grid_y * pl.grid_z);
  const int64_t pixels = int64_t(g.N) * g.P * g.Q;
  int64_t splits = (target + blocks - 1) / blocks;
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, pixels / 1024));
  return int(std::clamp<int64_t>(splits, 1, 128));
}

// The geometry the CUDA path launches `pass` with (channel-padded, or
// folded for forward and wgrad where use_fold says so).
ConvGeom cuda_geometry(const Operands& o, Pass pass, DType dt, bool allow_tf32) {
  const int64_t vec = kVecBytes / element_bytes(dt);
  if (pass != Pass::Dgrad && use_fold(o.orig, vec, uses_mma(dt, allow_tf32))) return folded_geometry(o);
  return o.g;
}

// The launch plan of one pass of the CUDA path for these operands, as the
// host code below would launch it: [bm, bn, bk, threads, splits, mma,
// grid_x, grid_y, grid_z, M, N, Kred, k_tiles, kind, variant, fold, gemm
// pass (3: dgrad by columns), images per launch, launches]. Needs no GPU (a test and
// tools/conv_model.py hook): `input` and `weight` only give shapes and dtype.
std::vector<int64_t> conv2d_relu_plan(const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef stride,
                                      at::IntArrayRef padding, int64_t groups, int64_t pass, bool allow_tf32) {
  const ConvGeom orig = check_and_geometry(input, weight, std::nullopt, stride, padding, groups);
  TORCH_CHECK(pass >= 0 && pass <= 2, kOp, " plan: `pass` must be 0 (forward), 1 (dgrad) or 2 (wgrad), got ", pass);
  const DType dt = dtype_tag(input.scalar_type());
  const Operands o = padded_geometry(orig, kVecBytes / element_bytes(dt));
  GemmLaunch p;
  p.pass = static_cast<Pass>(pass);
  p.g = cuda_geometry(o, p.pass, dt, allow_tf32);
  p.allow_tf32 = allow_tf32;
  if (p.pass == Pass::Wgrad) p.splits = wgrad_splits(p.g, dt, allow_tf32);
  // The strided dgrad by columns: the plan of one chunk's launch (the
  // first; the last may hold fewer images).
  int64_t chunk = orig.N, chunks = 1;
  if (p.pass == Pass::Dgrad && use_dgrad_columns(o, dt, allow_tf32)) {
    p.pass = Pass::DgradCols;
    p.g = columns_geometry(o);
    chunk = columns_chunk(p.g, element_bytes(dt) == 8 ? 8 : 4);
    chunks = (orig.N + chunk - 1) / chunk;
    p.g.N = int(chunk);
    p.g = with_divisors(p.g);
  }
  const GemmPlan pl = plan_gemm(dt, p);
  return {pl.bm, pl.bn, pl.bk, pl.threads, pl.splits, pl.mma ? 1 : 0, pl.grid_x, pl.grid_y, pl.grid_z,
          pl.dims.M, pl.dims.N, pl.dims.Kred, pl.k_tiles, pl.kind, pl.variant, p.g.fold,
          static_cast<int64_t>(p.pass), chunk, chunks};
}

// ---------------------------------------------------------------------------
// CPU

at::Tensor forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const ConvGeom& g, at::IntArrayRef stride, at::IntArrayRef padding, at::Tensor& y,
                       at::MemoryFormat fmt) {
  const auto acc = at::toOpMathType(x.scalar_type());
  at::Tensor conv = at::convolution(x.to(acc), weight.to(acc), std::nullopt, stride, padding, {1, 1}, false,
                                    {0, 0}, g.groups)
                        .contiguous(fmt);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->to(acc).contiguous() : at::Tensor();
  if (conv.scalar_type() == x.scalar_type()) {
    // float32/float64: ATen's result already has the output's dtype and
    // layout, so bias + ReLU run in place instead of writing a second tensor.
    bias_relu_cpu(conv, b, conv, fmt);
    return conv;
  }
  bias_relu_cpu(conv, b, y, fmt);
  return y;
}

// ---------------------------------------------------------------------------
// CUDA

#ifdef ALEXNET_EXT_WITH_CUDA
int64_t vec_elems(const at::Tensor& t) { return kVecBytes / int64_t(t.element_size()); }

// The kernels copy 16-byte vectors: an operand that merely views the
// caller's storage (e.g. a channels_last slice) may start off that grid.
at::Tensor aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % kVecBytes == 0 ? t : t.clone();
}


void forward_cuda(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const ConvGeom& orig, at::Tensor& y) {
  c10::DeviceGuard guard(input.device());
  check_gemm_indexing(orig, vec_elems(input));
  const Operands o = padded_geometry(orig, vec_elems(input));
  const DType dt = dtype_tag(input.scalar_type());
  const bool tf32 = conv_uses_tf32(input.scalar_type());
  const ConvGeom g = cuda_geometry(o, Pass::Forward, dt, tf32);
  const at::Tensor x = aligned(g.fold ? x_folded(input, g, orig) : to_nhwc(input, g.groups, g.Cg));
  const at::Tensor w = aligned(packed_weight(weight, o, g.fold ? PackKind::Folded : PackKind::Krsc));
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = pad_groups_last(*bias, g.groups, g.Kg);
  // Write straight into y when it already is the NHWC buffer the kernel fills.
  const bool direct = g.K == orig.K && y.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor out = direct ? y : at::empty({g.N, g.P, g.Q, g.K}, input.options());
  GemmLaunch p;
  p.g = g;
  p.pass = Pass::Forward;
  p.a = x.const_data_ptr();
  p.b = w.const_data_ptr();
  p.d = out.mutable_data_ptr();
  p.bias = b.defined() ? b.const_data_ptr() : nullptr;
  p.allow_tf32 = tf32;
  p.force_variant = g_force_variant.load();
  void* stream = current_stream(input);
  check_launch(conv_gemm_cuda(dt, p, stream), kOp, "conv_gemm_cuda (forward)", stream);
  if (!direct) y.copy_(unpad_nhwc(out, g.groups, g.Kg, orig.Kg));
}

// grad_output or output as relu_grad_prep_cuda reads it: NCHW or NHWC
// strides as they are (the kernel reads either layout coalesced), any other
// strides copied to NCHW first. Strides are the canonical ones of the
// layout, which also index size-1 dimensions correctly.
at::Tensor plane_operand(const at::Tensor& t, PlaneStrides& st) {
  const int64_t K = t.size(1), pixels = t.size(2) * t.size(3);
  if (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    st = {pixels * K, 1, K};
    return t;
  }
  st = {K * pixels, pixels, 1};
  return t.contiguous();
}

// Row ranges of the preparation pass: kSms * 8 blocks of 256 threads (more
// than its 40-56 registers let an SM hold at once: every SM stays busy to
// the end), at least one tile per range; at most 128 ranges when the bias
// gradient's partial sums are kept, the number reduce_splits adds per column.
int prep_splits(int64_t rows, int64_t cols, bool column_sums) {
  const int64_t tiles = (rows + kPrepTile - 1) / kPrepTile;
  const int64_t col_tiles = (cols + kPrepTile - 1) / kPrepTile;
  int64_t splits = (kSms * 8 + col_tiles - 1) / col_tiles;
  if (column_sums) splits = std::min<int64_t>(splits, 128);
  return int(std::clamp<int64_t>(splits, 1, std::min<int64_t>(tiles, 65535)));
}

// The strided dgrad as a GEMM into float32/64 columns and a gather
// (conv_math.h, Pass::DgradCols), one chunk of whole images at a time under
// columns_chunk's workspace bound. The gather writes the caller's dx
// through its strides (NCHW or channels_last alike: no copy back). `p`
// carries the TF32 setting and the test hook's forced variant.
void dgrad_by_columns_cuda(const at::Tensor& dym, const at::Tensor& weight, const Operands& o, DType dt,
                           GemmLaunch p, at::Tensor& dx, void* stream) {
  ConvGeom gc = columns_geometry(o);
  const at::Tensor wc = aligned(weight_for_columns(weight, gc, o.orig));
  const auto acc = at::toOpMathType(dym.scalar_type());
  const int64_t chunk = columns_chunk(gc, at::elementSize(acc));
  const int64_t cols_per_image = int64_t(gc.P) * gc.Q * gc.groups * gc.R * gc.S * gc.Cg;
  at::Tensor cols = at::empty({chunk * cols_per_image}, dym.options().dtype(acc));
  const Col2imStrides st{dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3)};
  const int64_t dy_per_image = int64_t(gc.P) * gc.Q * gc.K;
  p.pass = Pass::DgradCols;
  p.b = wc.const_data_ptr();
  p.d = cols.mutable_data_ptr();
  for (int64_t n0 = 0; n0 < o.orig.N; n0 += chunk) {
    gc.N = int(std::min<int64_t>(chunk, o.orig.N - n0));
    p.g = gc;
    // dy rows of whole images: K is a multiple of the 16-byte vector, so
    // every chunk's start stays aligned.
    p.a = static_cast<const char*>(dym.const_data_ptr()) + n0 * dy_per_image * dym.element_size();
    check_launch(conv_gemm_cuda(dt, p, stream), kOpBackward, "conv_gemm_cuda (dgrad columns)", stream);
    void* dx_chunk = static_cast<char*>(dx.mutable_data_ptr()) + n0 * dx.stride(0) * dx.element_size();
    check_launch(col2im_cuda(dt, gc, cols.const_data_ptr(), dx_chunk, st, stream), kOpBackward,
                 "col2im_cuda (dgrad columns)", stream);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                                             const at::Tensor& weight, const at::Tensor& output,
                                                             const ConvGeom& orig, std::array<bool, 3> mask,
                                                             at::Tensor& dx, at::Tensor& dw, at::Tensor& db) {
  c10::DeviceGuard guard(input.device());
  const DType dt = dtype_tag(input.scalar_type());
  void* stream = current_stream(input);
  check_gemm_indexing(orig, vec_elems(input));
  const Operands o = padded_geometry(orig, vec_elems(input));
  const ConvGeom& g = o.g;
  // One pass over dy and y where they lie (NCHW or NHWC): dym =
  // relu_grad(dy, y) as NPQK with padded channels (zeros) and, for the bias
  // gradient, its column sums per row range, reduced in order by
  // reduce_splits (deterministic, no atomics).
  const auto acc = at::toOpMathType(input.scalar_type());
  ReluGradPrep prep;
  const at::Tensor dy = plane_operand(grad_output, prep.dy_strides);
  const at::Tensor y = plane_operand(output, prep.y_strides);
  const at::Tensor dym = at::empty({g.N, g.P, g.Q, g.K}, input.options());
  prep.dy = dy.const_data_ptr();
  prep.y = y.const_data_ptr();
  prep.dym = dym.mutable_data_ptr();
  prep.rows = int64_t(g.N) * g.P * g.Q;
  prep.pixels = make_fast_div(g.P * g.Q);
  prep.groups = g.groups;
  prep.kg = orig.Kg;
  prep.kg_pad = g.Kg;
  prep.splits = prep_splits(prep.rows, g.K, mask[2]);
  at::Tensor partial;
  if (mask[2]) {
    partial = at::empty({prep.splits, g.K}, input.options().dtype(acc));
    prep.partial = partial.mutable_data_ptr();
  }
  check_launch(relu_grad_prep_cuda(dt, prep, stream), kOpBackward, "relu_grad_prep_cuda", stream);
  if (mask[2]) {
    // Straight into db when no channel is padding.
    at::Tensor sums = g.K == orig.K ? db : at::empty({g.K}, input.options());
    check_launch(reduce_splits_cuda(dt, partial.const_data_ptr(), sums.mutable_data_ptr(), g.K, prep.splits, stream),
                 kOpBackward, "reduce_splits_cuda (bias gradient)", stream);
    if (g.K != orig.K) db.copy_(sums.reshape({g.groups, g.Kg}).narrow(1, 0, orig.Kg).reshape({orig.K}));
  }
  GemmLaunch p;
  p.g = g;
  p.allow_tf32 = conv_uses_tf32(input.scalar_type());
  p.force_variant = g_force_variant.load();
  if (mask[0] && use_dgrad_columns(o, dt, p.allow_tf32)) {
    dgrad_by_columns_cuda(dym, weight, o, dt, p, dx, stream);
  } else if (mask[0]) {
    const at::Tensor wt = aligned(packed_weight(weight, o, PackKind::Dgrad));
    const bool direct = g.C == orig.C && dx.is_contiguous(at::MemoryFormat::ChannelsLast);
    at::Tensor out = direct ? dx : at::empty({g.N, g.H, g.W, g.C}, input.options());
    p.pass = Pass::Dgrad;
    p.a = dym.const_data_ptr();
    p.b = wt.const_data_ptr();
    p.d = out.mutable_data_ptr();
    check_launch(conv_gemm_cuda(dt, p, stream), kOpBackward, "conv_gemm_cuda (dgrad)", stream);
    if (!direct) dx.copy_(unpad_nhwc(out, g.groups, g.Cg, orig.Cg));
  }
  if (mask[1]) {
    const ConvGeom gw = cuda_geometry(o, Pass::Wgrad, dt, p.allow_tf32);
    const at::Tensor x = aligned(gw.fold ? x_folded(input, gw, orig) : to_nhwc(input, g.groups, g.Cg));
    p.g = gw;
    p.pass = Pass::Wgrad;
    p.splits = wgrad_splits(gw, dt, p.allow_tf32);
    // dw as the GEMM writes it: (K', R, S, Cg') or folded (K', R * fold).
    const int64_t dw_numel = gw.fold ? int64_t(gw.K) * gw.R * gw.fold : int64_t(g.K) * g.R * g.S * g.Cg;
    at::Tensor ws = at::empty({p.splits, dw_numel}, input.options().dtype(acc));
    at::Tensor out = at::empty({dw_numel}, input.options());
    // The folded wgrad's long side, (r, u) of x, is its GEMM's M: A = x.
    p.a = (gw.fold ? x : dym).const_data_ptr();
    p.b = (gw.fold ? dym : x).const_data_ptr();
    p.d = ws.mutable_data_ptr();
    check_launch(conv_gemm_cuda(dt, p, stream), kOpBackward, "conv_gemm_cuda (wgrad)", stream);
    check_launch(reduce_splits_cuda(dt, ws.const_data_ptr(), out.mutable_data_ptr(), out.numel(), p.splits, stream),
                 kOpBackward, "reduce_splits_cuda (wgrad)", stream);
    if (gw.fold) {
      dw.copy_(unfold_weight(out.view({gw.K, int64_t(gw.R) * gw.fold}), gw, orig));
    } else {
      dw.copy_(unpad_krsc(out.view({g.K, g.R, g.S, g.Cg}), o));
    }
  }
  return {dx, dw, db};
}
#endif

// ---------------------------------------------------------------------------
// Operators

at::Tensor conv2d_relu_forward(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups) {
  const ConvGeom g = check_and_geometry(input, weight, bias, stride, padding, groups);
  const at::MemoryFormat fmt = suggested_format(input);
  at::Tensor y = new_output(output_sizes(g), input.options(), fmt);
  if (y.numel() == 0) return y;
  if (input.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    forward_cuda(input, weight, bias, g, y);
#endif
    return y;
  }
  return forward_cpu(input, weight, bias, g, stride, padding, y, fmt);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& output,
    at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, std::array<bool, 3> output_mask) {
  const ConvGeom g = check_and_geometry(input, weight, std::nullopt, stride, padding, groups);
  const DropPackedOnExit drop_packed_weight{weight, output_mask[1]};
  check_float_tensor(grad_output, "grad_output");
  check_float_tensor(output, "output");
  check_same_device_dtype(grad_output, "grad_output", input, "input");
  check_same_device_dtype(output, "output", input, "input");
  const auto expect = output_sizes(g);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(expect), kOp, " backward: `grad_output` must have shape ",
              at::IntArrayRef(expect), ", got ", grad_output.sizes());
  TORCH_CHECK(output.sizes() == at::IntArrayRef(expect), kOp, " backward: `output` must have shape ",
              at::IntArrayRef(expect), ", got ", output.sizes());
  // Gradients not asked for come back as empty tensors.
  const auto opts = input.options();
  at::Tensor dx = output_mask[0] ? new_output(input.sizes(), opts, suggested_format(input)) : at::empty({0}, opts);
  at::Tensor dw = output_mask[1] ? new_output(weight.sizes(), opts, suggested_format(weight)) : at::empty({0}, opts);
  at::Tensor db = output_mask[2] ? new_output({g.K}, opts) : at::empty({0}, opts);
  if (grad_output.numel() == 0) {
    // No output pixels (N == 0): every gradient is zero.
    if (output_mask[0]) dx.zero_();
    if (output_mask[1]) dw.zero_();
    if (output_mask[2]) db.zero_();
    return {dx, dw, db};
  }
  if (input.is_cuda()) {
#ifdef ALEXNET_EXT_WITH_CUDA
    return backward_cuda(grad_output, input, weight, output, g, output_mask, dx, dw, db);
#endif
    return {dx, dw, db};
  }
  const at::MemoryFormat fmt = suggested_format(output);
  const at::Tensor y = output.contiguous(fmt);
  at::Tensor dym = at::empty_like(y);
  relu_grad_cpu(grad_output.contiguous(fmt), y, dym);
  const auto acc = at::toOpMathType(input.scalar_type());
  if (output_mask[2]) db.copy_(dym.sum({0, 2, 3}, false, acc));
  if (output_mask[0] || output_mask[1]) {
    auto grads = at::convolution_backward(dym.to(acc), input.to(acc), weight.to(acc), std::nullopt, stride, padding,
                                          {1, 1}, false, {0, 0}, groups, {output_mask[0], output_mask[1], false});
    // ATen's gradients are returned as they are when dtype and layout already
    // match (float32/float64); only reduced precision pays a conversion pass.
    const auto take = [](at::Tensor& dst, const at::Tensor& src, at::MemoryFormat f) {
      if (src.scalar_type() == dst.scalar_type() && src.is_contiguous(f)) {
        dst = src;
      } else {
        dst.copy_(src);
      }
    };
    if (output_mask[0]) take(dx, std::get<0>(grads), suggested_format(input));
    if (output_mask[1]) take(dw, std::get<1>(grads), suggested_format(weight));
  }
  return {dx, dw, db};
}

// The implicit GEMMs of conv_math.h run by plain CPU loops on the operands
// the CUDA path prepares (channels padded to `vec`), forward and backward:
// (y, dx, dw, db) in the accumulation dtype. A test hook, not a fast path.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv2d_relu_gemm_reference(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& grad_output, at::IntArrayRef stride, at::IntArrayRef padding, int64_t groups, int64_t vec,
    int64_t splits, bool fold, bool dgrad_columns) {
  const ConvGeom orig = check_and_geometry(input, weight, bias, stride, padding, groups);
  TORCH_CHECK(input.is_cpu(), kOp, " reference: `input` must be a CPU tensor");
  TORCH_CHECK(vec >= 1 && splits >= 1, kOp, " reference: `vec` and `splits` must be >= 1");
  check_gemm_indexing(orig, vec);
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(output_sizes(orig)), kOp, " reference: `grad_output` shape");
  const Operands o = padded_geometry(orig, vec);
  const ConvGeom& g = o.g;
  const auto acc = at::toOpMathType(input.scalar_type());
  const auto acc_opts = input.options().dtype(acc);
  const at::Tensor x = to_nhwc(input, g.groups, g.Cg);
  const at::Tensor w = weight_krsc(weight, o);
  const at::Tensor wt = weight_for_dgrad(w, g);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) b = pad_groups_last(*bias, g.groups, g.Kg);
  // fold: forward and wgrad on the folded operands (when use_fold allows).
  const bool folded = fold && use_fold(orig, vec, true);
  const ConvGeom f = folded ? folded_geometry(o) : g;
  const at::Tensor xf = folded ? x_folded(input, f, orig) : x;
  at::Tensor y = at::empty({g.N, g.P, g.Q, g.K}, acc_opts);
  at::Tensor dx = at::empty({g.N, g.H, g.W, g.C}, acc_opts);
  at::Tensor dw = folded ? at::empty({f.K, int64_t(f.R) * f.fold}, acc_opts) : at::empty({g.K, g.R, g.S, g.Cg}, acc_opts);
  gemm_reference_cpu(f, Pass::Forward, xf, folded ? weight_folded(weight, f, orig) : w, b, y, 1, 1);
  at::Tensor dym = at::empty({g.N, g.P, g.Q, g.K}, input.options());
  relu_grad_cpu(to_nhwc(grad_output, g.groups, g.Kg), y.to(input.scalar_type()), dym);
  if (dgrad_columns) {
    // The columns GEMM over the whole batch into an accumulation-dtype
    // workspace, then the gather, as the CUDA path does (unpadded dx).
    const ConvGeom gc = columns_geometry(o);
    at::Tensor cols = at::empty({int64_t(gc.N) * gc.P * gc.Q * gc.groups * gc.R * gc.S * gc.Cg}, acc_opts);
    gemm_reference_cpu(gc, Pass::DgradCols, dym, weight_for_columns(weight, gc, orig), at::Tensor(), cols, 1, 1);
    dx = at::empty({g.N, g.H, g.W, orig.C}, acc_opts);
    col2im_reference_cpu(gc, cols, dx);
  } else {
    gemm_reference_cpu(g, Pass::Dgrad, dym, wt, at::Tensor(), dx, 1, 1);
  }
  // (folded wgrad: A = x, B = dy; conv_math.h)
  gemm_reference_cpu(f, Pass::Wgrad, folded ? xf : dym, folded ? dym : xf, at::Tensor(), dw, int(splits),
                     kTileKBytes / int(input.element_size()));
  const at::Tensor db = dym.to(acc).sum({0, 1, 2}).reshape({g.groups, g.Kg}).narrow(1, 0, orig.Kg).reshape({orig.K});
  const int64_t dx_cg = dgrad_columns ? orig.Cg : g.Cg;
  return {unpad_nhwc(y, g.groups, g.Kg, orig.Kg).contiguous(), unpad_nhwc(dx, g.groups, dx_cg, orig.Cg).contiguous(),
          (folded ? unfold_weight(dw, f, orig) : unpad_krsc(dw, o)).contiguous(), db};
}

#ifndef ALEXNET_EXT_WITH_CUDA
at::Tensor forward_no_cuda(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::IntArrayRef,
                           at::IntArrayRef, int64_t) {
  throw_no_cuda_kernels(kOp);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_no_cuda(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                                                                at::IntArrayRef, int64_t, std::array<bool, 3>) {
  throw_no_cuda_kernels(kOp);
}
#endif

}  // namespace
}  // namespace conv
}  // namespace alexnet_ext

TORCH_LIBRARY_FRAGMENT(alexnet_ext, m) {
  m.def("conv2d_relu_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, int groups) "
        "-> Tensor");
  m.def("conv2d_relu_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor output, int[2] stride, "
        "int[2] padding, int groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Test hook: whether the CUDA kernels would use TF32 for this dtype now.
  m.def("_conv2d_relu_uses_tf32(ScalarType dtype) -> bool", &alexnet_ext::conv::conv_uses_tf32);
  m.def("_conv2d_relu_force_variant(int variant) -> ()", &alexnet_ext::conv::force_variant);
  m.def("_conv2d_relu_plan(Tensor input, Tensor weight, int[2] stride, int[2] padding, int groups, int pass_, "
        "bool allow_tf32) -> int[]");
  m.def("_conv2d_relu_gemm_reference(Tensor input, Tensor weight, Tensor? bias, Tensor grad_output, int[2] stride, "
        "int[2] padding, int groups, int vec, int splits, bool fold=False, bool dgrad_columns=False) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("_conv2d_relu_columns_limit(int bytes) -> int", &alexnet_ext::conv::set_columns_limit);
  // Packed-weight cache (weight_cache.h): enable 1/0 (-1: unchanged), clear;
  // returns [enabled, hits, misses, skips, entries, bytes].
  m.def("_conv2d_relu_weight_cache(int enable=-1, bool clear=False) -> int[]", &alexnet_ext::conv::weight_cache_hook);
  m.def("_conv2d_relu_packed_weight(Tensor weight, int groups, int vec, int kind) -> Tensor");
}

TORCH_LIBRARY_IMPL(alexnet_ext, CompositeExplicitAutograd, m) {
  m.impl("_conv2d_relu_packed_weight", &alexnet_ext::conv::packed_weight_hook);
}

TORCH_LIBRARY_IMPL(alexnet_ext, CPU, m) {
  m.impl("conv2d_relu_forward", &alexnet_ext::conv::conv2d_relu_forward);
  m.impl("conv2d_relu_backward", &alexnet_ext::conv::conv2d_relu_backward);
  m.impl("_conv2d_relu_gemm_reference", &alexnet_ext::conv::conv2d_relu_gemm_reference);
  m.impl("_conv2d_relu_plan", &alexnet_ext::conv::conv2d_relu_plan);
}

TORCH_LIBRARY_IMPL(alexnet_ext, CUDA, m) {
#ifdef ALEXNET_EXT_WITH_CUDA
  m.impl("conv2d_relu_forward", &alexnet_ext::conv::conv2d_relu_forward);
  m.impl("conv2d_relu_backward", &alexnet_ext::conv::conv2d_relu_backward);
#else
  m.impl("conv2d_relu_forward", &alexnet_ext::conv::forward_no_cuda);
  m.impl("conv2d_relu_backward", &alexnet_ext::conv::backward_no_cuda);
#endif
}
