"""conv2d + bias + ReLU against F.relu(F.conv2d(...)) in float64.

Tolerances are relative to the largest reference value of each tensor
(outputs and gradients are sums of many products, so an absolute error
only means something next to their scale), chosen from the precision:
  float64            1e-10
  float32 exact      2e-5   (CPU, and CUDA FFMA with TF32 off)
  float32 TF32       1e-2   (CUDA tensor cores round operands to 10 mantissa
                             bits: 2^-11 = 4.9e-4 relative per operand)
  float16            1e-2   (operands exact, float32 accumulation; the output
                             and every gradient round once to 2^-11)
  bfloat16           4e-2   (one rounding to 8 bits: 2^-8 = 3.9e-3)
with headroom for the ratio of a sum's rounding error to its largest value.
"""

import pytest
import torch
import torch.nn.functional as F

import alexnet_ext
from alexnet_ext.functional import conv2d_relu
from op_testing import DEVICES, DTYPES, HAS_CUDA, check_compiled_matches_eager, random_input, requires_cuda, with_layout

_ops = torch.ops.alexnet_ext

REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}
TF32_REL_TOL = 1e-2


def rel_tol(dtype, device):
    # The kernels' own reading of PyTorch's convolution TF32 setting (the
    # legacy torch.backends.cudnn.allow_tf32 flag is not what they follow).
    if dtype == torch.float32 and device == "cuda" and torch.ops.alexnet_ext._conv2d_relu_uses_tf32(dtype):
        return TF32_REL_TOL
    return REL_TOL[dtype]


def assert_close_rel(got, want, tol, what):
    got = got.detach().double().cpu()
    assert got.shape == want.shape, what
    scale = max(want.abs().max().item(), 1e-12)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


# AlexNet's five conv layers at batch 2 with their real channel counts,
# kernels, strides and paddings; conv1's input reduced from 224 to 47.
# (N, C, H, W, K, R, S, stride, padding, groups)
ALEXNET = {
    "conv1": (2, 3, 47, 47, 96, 11, 11, 4, 2, 1),
    "conv2": (2, 96, 13, 13, 256, 5, 5, 1, 2, 2),
    "conv3": (2, 256, 7, 7, 384, 3, 3, 1, 1, 1),
    "conv4": (2, 384, 7, 7, 384, 3, 3, 1, 1, 2),
    "conv5": (2, 384, 7, 7, 256, 3, 3, 1, 1, 2),
}

# Odd sizes, every stride 1..4 and padding 0..2, groups 1 and 2, channel
# counts that are not multiples of the CUDA vector width, non-square kernels.
ODD = [
    (1, 5, 9, 7, 7, 3, 3, 1, 0, 1),
    (2, 6, 11, 10, 4, 3, 2, 2, 1, 2),
    (3, 4, 12, 9, 6, 5, 5, 3, 2, 2),
    (1, 3, 13, 15, 5, 4, 3, 4, 1, 1),
    (2, 10, 5, 6, 14, 1, 1, 1, 0, 2),
    (1, 7, 8, 8, 9, 3, 5, (2, 1), (1, 2), 1),
]


# Few input channels (conv1's C = 3): on the CUDA tensor-core path forward
# and wgrad fold (filter column, channel) into one reduction run instead of
# padding C to 16 bytes (where stride_w * C is a multiple of 4). Odd widths
# and heights, borders on every side, strides 1-4.
FEW_CHANNELS = [
    (2, 3, 19, 23, 10, 11, 11, 4, 2, 1),
    (1, 3, 13, 15, 5, 4, 3, 4, 1, 1),
    (2, 4, 9, 11, 6, 3, 5, (2, 1), (1, 2), 1),
    (1, 2, 10, 9, 5, 3, 3, 2, 1, 1),
    (1, 1, 17, 17, 3, 5, 5, 4, 2, 1),
    (2, 3, 12, 13, 50, 7, 7, (1, 4), (3, 0), 1),
]


def make_case(case, dtype, device, layout, bias=True, requires_grad=True):
    n, c, h, w, k, r, s, stride, padding, groups = case
    # Weights scaled by 1/sqrt(fan_in) so outputs are O(1), as in a trained net.
    x = random_input((n, c, h, w), dtype, device, layout, requires_grad=requires_grad)
    wt = random_input((k, c // groups, r, s), dtype, device, scale=(c // groups * r * s) ** -0.5,
                      requires_grad=requires_grad)
    b = random_input((k,), dtype, device, scale=0.5, requires_grad=requires_grad) if bias else None
    return x, wt, b, dict(stride=stride, padding=padding, groups=groups)


def reference(x, w, b, kw):
    cast = lambda t: None if t is None else t.detach().double().cpu().requires_grad_(t.requires_grad)
    rx, rw, rb = cast(x), cast(w), cast(b)
    return rx, rw, rb, F.relu(F.conv2d(rx, rw, rb, **kw))


def check_case(case, dtype, device, layout, bias=True, tol=None):
    x, w, b, kw = make_case(case, dtype, device, layout, bias)
    y = conv2d_relu(x, w, b, **kw)
    rx, rw, rb, ry = reference(x, w, b, kw)
    tol = tol or rel_tol(dtype, device)
    assert y.dtype == dtype and y.device == x.device
    assert_close_rel(y, ry, tol, "output")
    upstream = torch.randn(ry.shape, dtype=torch.float64).to(dtype)
    inputs = [t for t in (x, w, b) if t is not None]
    ref_inputs = [t for t in (rx, rw, rb) if t is not None]
    got = torch.autograd.grad(y, inputs, upstream.to(device))
    # Where the exact pre-activation is within rounding of 0, the two ReLU
    # masks may legitimately differ; below float64 the reference gradient
    # therefore uses our output's mask (the mask itself is checked exactly
    # in float64 and by test_nan_propagates_...).
    mask = ry > 0 if dtype == torch.float64 else ~(y.detach().double().cpu() <= 0)
    z = F.conv2d(rx, rw, rb, **kw)
    want = torch.autograd.grad(z, ref_inputs, upstream.double() * mask)
    for name, g, r, t in zip(("grad input", "grad weight", "grad bias"), got, want, inputs):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close_rel(g, r, tol, name)
    return y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("layer", list(ALEXNET))
def test_alexnet_layers(device, dtype, layout, layer):
    check_case(ALEXNET[layer], dtype, device, layout)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", ODD, ids=lambda c: "x".join(map(str, c[:4])))
def test_odd_shapes_strides_paddings(device, dtype, layout, bias, case):
    check_case(case, dtype, device, layout, bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", FEW_CHANNELS, ids=lambda c: "x".join(map(str, c[:4])))
def test_few_input_channels(device, dtype, layout, case):
    # float32 at TF32 tolerance whenever PyTorch allows TF32 convolutions:
    # the folded path exists on tensor cores only, and the emulator's run of
    # these CPU tests takes the CUDA path (CPU float32 is exact, and checked
    # at 2e-5 by the tests above).
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    check_case(case, dtype, device, layout, tol=TF32_REL_TOL if tf32 else None)


# The strided dgrad by columns (conv_math.h's Pass::DgradCols + col2im):
# conv1's geometry at a small size, C = 1/3/5, strides 2, 3, 4 and (4, 2),
# groups, padding 0 and > 0, sizes the stride does not divide (rows and
# columns no tap reaches), a stride larger than the kernel (gaps).
DGRAD_COLUMNS = [
    (2, 3, 31, 29, 8, 11, 11, 4, 2, 1),
    (1, 1, 9, 10, 4, 3, 3, 2, 0, 1),
    (2, 5, 11, 13, 6, 5, 3, 3, (1, 2), 1),
    (3, 6, 10, 9, 8, 3, 3, 2, 1, 2),
    (2, 3, 16, 17, 4, 2, 2, 3, 0, 1),
    (2, 3, 12, 11, 5, 4, 3, (4, 2), (1, 0), 1),
]


@pytest.mark.parametrize("case", ODD + FEW_CHANNELS + DGRAD_COLUMNS + [(1, 3, 27, 27, 96, 11, 11, 4, 2, 1)],
                         ids=lambda c: "x".join(map(str, c[:4])))
@pytest.mark.parametrize("vec", [1, 2, 8])
@pytest.mark.parametrize("fold,dgrad_columns", [(False, False), (True, False), (False, True)],
                         ids=["plain", "fold", "dgrad_columns"])
def test_implicit_gemm_index_math_matches_torch(case, vec, fold, dgrad_columns):
    """The GEMMs of csrc/conv/conv_math.h (the CUDA kernels' index math),
    run by CPU loops on the operands the CUDA wrapper prepares (NHWC, KRSC,
    channels padded to `vec`; with `fold`, forward and wgrad on the folded
    operands of few-channel inputs where the wrapper folds; with
    `dgrad_columns`, dgrad as the columns GEMM + col2im gather), with 3-way
    split-K wgrad: forward, dgrad, wgrad and bias grad against torch."""
    x, w, b, kw = make_case(case, torch.float64, "cpu", "contiguous", requires_grad=False)
    stride = kw["stride"] if isinstance(kw["stride"], tuple) else (kw["stride"],) * 2
    padding = kw["padding"] if isinstance(kw["padding"], tuple) else (kw["padding"],) * 2
    rx, rw, rb, ry = reference(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), kw)
    upstream = torch.randn(ry.shape, dtype=torch.float64)
    want = torch.autograd.grad(ry, (rx, rw, rb), upstream)
    got = _ops._conv2d_relu_gemm_reference(x.detach(), w.detach(), b.detach(), upstream, list(stride),
                                           list(padding), kw["groups"], vec, 3, fold, dgrad_columns)
    for name, g, r in zip(("output", "grad input", "grad weight", "grad bias"), got, (ry,) + want):
        assert_close_rel(g, r.detach(), 1e-10, name)


# (variant index of conv_cuda.h's kMmaVariants, case): every tensor-core
# tile, including those the plan picks only for AlexNet-sized grids (too
# large for the emulator, whose run of these CPU tests takes the CUDA path).
# Variant 11 (the dgrad columns GEMM) runs in the strided few-channel
# case's dgrad.
FOLDED_VARIANTS = (6, 7, 8, 9, 11)
FORCED_VARIANTS = [(v, case) for v in range(12) for case in (
    [(2, 3, 19, 23, 10, 11, 11, 4, 2, 1)] if v in FOLDED_VARIANTS else [(2, 24, 9, 11, 72, 3, 3, 1, 1, 2), (3, 16, 7, 6, 40, 3, 2, 2, 1, 1)])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant,case", FORCED_VARIANTS, ids=lambda c: "x".join(map(str, c[:4])) if isinstance(c, tuple) else str(c))
def test_every_tile_variant(device, dtype, variant, case):
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    _ops._conv2d_relu_force_variant(variant)
    try:
        check_case(case, dtype, device, "channels_last", tol=TF32_REL_TOL if tf32 else None)
    finally:
        _ops._conv2d_relu_force_variant(-1)


# One column of the two-column AlexNet at batch 128: (C, H, K, R, stride, padding).
ALEXNET_COLUMN = {"conv1": (3, 224, 48, 11, 4, 2), "conv2": (48, 27, 128, 5, 1, 2), "conv3": (256, 13, 192, 3, 1, 1),
                  "conv4": (192, 13, 192, 3, 1, 1), "conv5": (192, 13, 128, 3, 1, 1)}
PLAN_FIELDS = ("bm", "bn", "bk", "threads", "splits", "mma", "grid_x", "grid_y", "grid_z", "M", "N", "Kred", "k_tiles",
               "kind", "variant", "fold", "gemm_pass", "chunk", "chunks")
DGRAD_BY_COLUMNS = 3  # gemm_pass of the strided dgrad's columns GEMM


def launch_plan(x, w, stride, padding, groups, pass_, tf32=True):
    stride = stride if isinstance(stride, tuple) else (stride,) * 2
    padding = padding if isinstance(padding, tuple) else (padding,) * 2
    return dict(zip(PLAN_FIELDS, _ops._conv2d_relu_plan(x, w, list(stride), list(padding), groups, pass_, tf32)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layer", list(ALEXNET_COLUMN))
@pytest.mark.parametrize("pass_", [0, 1, 2], ids=["fwd", "dgrad", "wgrad"])
def test_launch_plan_work_on_alexnet(dtype, layer, pass_):
    """The CUDA launch plan (host code, no GPU needed) executes at most 1.15x
    the useful MMA work of every AlexNet layer and pass (issue 11): conv1's
    strided dgrad by the columns GEMM (every launch over its chunks of
    images, each chunk's float32 columns within 64 MiB), the stride-1 layers'
    dgrad directly. A split-K plan keeps every split non-empty."""
    c, h, k, r, stride, padding = ALEXNET_COLUMN[layer]
    x = torch.empty(1, dtype=dtype).expand(128, c, h, h)
    w = torch.empty(1, dtype=dtype).expand(k, c, r, r)
    pl = launch_plan(x, w, stride, padding, 1, pass_)
    p = (h + 2 * padding - r) // stride + 1
    useful = 128 * p * p * k * r * r * c
    by_columns = pl["gemm_pass"] == DGRAD_BY_COLUMNS
    assert by_columns == (layer == "conv1" and pass_ == 1), pl
    assert pl["gemm_pass"] == (DGRAD_BY_COLUMNS if by_columns else pass_)
    # M rows of every launch's grid (dgrad by columns: one launch per chunk
    # of images, p*p rows each, the last chunk with the rest).
    rows = lambda images: -(-images * p * p // pl["bm"]) * pl["bm"]
    last = 128 - (pl["chunks"] - 1) * pl["chunk"]
    m_rows = (pl["chunks"] - 1) * rows(pl["chunk"]) + rows(last) if by_columns else pl["grid_x"] * pl["bm"]
    executed = m_rows * pl["grid_y"] * pl["bn"] * pl["k_tiles"] * pl["bk"]
    assert pl["mma"] == 1 and pl["variant"] >= 0
    assert (pl["fold"] > 0) == (layer == "conv1" and pass_ != 1)
    assert executed / useful <= 1.15, pl
    if by_columns:
        assert (pl["M"], pl["N"], pl["Kred"]) == (pl["chunk"] * p * p, r * r * c, k)
        assert pl["chunk"] * p * p * r * r * c * 4 <= 64 << 20 < (pl["chunk"] + 1) * p * p * r * r * c * 4
        assert 0 < last <= pl["chunk"] and pl["grid_x"] * pl["grid_y"] >= 2 * 132 * 2
    else:
        assert pl["chunks"] == 1 and pl["chunk"] == 128
    per_split = -(-pl["k_tiles"] // pl["splits"])
    assert (pl["splits"] - 1) * per_split < pl["k_tiles"], pl


@pytest.mark.parametrize("dtype,tf32", [(torch.bfloat16, True), (torch.float16, True), (torch.float32, True),
                                        (torch.float32, False), (torch.float64, True)],
                         ids=["bf16", "fp16", "tf32", "fp32", "fp64"])
def test_plan_takes_dgrad_by_columns_only_where_it_saves_work(dtype, tf32):
    """Every DGRAD_COLUMNS case (strided, few channels) runs dgrad by
    columns, on tensor cores and FFMA alike; stride 1 never does (even with
    three channels), and the columns limit 0 turns it off."""
    for case in DGRAD_COLUMNS:
        x, w, _, kw = make_case(case, dtype, "cpu", "contiguous", requires_grad=False)
        pl = launch_plan(x, w, kw["stride"], kw["padding"], kw["groups"], 1, tf32)
        assert pl["gemm_pass"] == DGRAD_BY_COLUMNS and pl["kind"] == (4 if pl["mma"] else 0), (case, pl)
        n, c, h, wd, k, r, s = case[:7]
        assert (pl["N"], pl["Kred"] >= k // kw["groups"], pl["chunks"]) == (r * s * c // kw["groups"], True, 1)
    for case in [(2, 3, 19, 23, 10, 11, 11, 1, 2, 1), (2, 1, 9, 9, 4, 3, 3, 1, 0, 1), ALEXNET["conv2"]]:
        x, w, _, kw = make_case(case, dtype, "cpu", "contiguous", requires_grad=False)
        assert launch_plan(x, w, kw["stride"], kw["padding"], kw["groups"], 1, tf32)["gemm_pass"] == 1, case
    old = _ops._conv2d_relu_columns_limit(0)
    try:
        x, w, _, kw = make_case(DGRAD_COLUMNS[0], dtype, "cpu", "contiguous", requires_grad=False)
        assert launch_plan(x, w, kw["stride"], kw["padding"], kw["groups"], 1, tf32)["gemm_pass"] == 1
    finally:
        _ops._conv2d_relu_columns_limit(old)


# (dtype, allow TF32): every path of the columns GEMM (tensor cores in
# bf16/fp16/TF32, FFMA in float32 and float64).
PRECISIONS = [(torch.float64, True), (torch.float32, True), (torch.float32, False), (torch.float16, True),
              (torch.bfloat16, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tf32", PRECISIONS, ids=["fp64", "tf32", "fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", DGRAD_COLUMNS, ids=lambda c: "x".join(map(str, c[:4])))
def test_strided_dgrad_by_columns(device, dtype, tf32, layout, case):
    """conv2d_relu's input gradient where the plan takes the columns GEMM +
    col2im gather (on the CUDA path; the emulator's run of these CPU tests
    takes it), written straight into dx's NCHW or channels_last layout."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        check_case(case, dtype, device, layout, tol=TF32_REL_TOL if dtype == torch.float32 and tf32 else None)
    finally:
        torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("limit", [1, 0], ids=["one-image-chunks", "direct"])
@pytest.mark.parametrize("case", [DGRAD_COLUMNS[0], DGRAD_COLUMNS[3]], ids=lambda c: "x".join(map(str, c[:4])))
def test_strided_dgrad_in_chunks_and_direct(device, dtype, limit, case):
    """A 1-byte columns bound: one image per launch (chunk offsets into dy,
    dx and the reused workspace); 0: the direct strided dgrad instead."""
    old = _ops._conv2d_relu_columns_limit(limit)
    try:
        x, w, _, kw = make_case(case, dtype, "cpu", "contiguous", requires_grad=False)
        pl = launch_plan(x, w, kw["stride"], kw["padding"], kw["groups"], 1)
        assert (pl["gemm_pass"], pl["chunks"]) == ((DGRAD_BY_COLUMNS, case[0]) if limit else (1, 1))
        check_case(case, dtype, device, "channels_last")
    finally:
        _ops._conv2d_relu_columns_limit(old)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    for case in [(1, 4, 5, 6, 4, 3, 3, 2, 1, 2), (2, 3, 4, 4, 2, 2, 3, 1, 0, 1)]:
        x, w, b, kw = make_case(case, torch.float64, device, "contiguous")
        assert torch.autograd.gradcheck(lambda *t: conv2d_relu(*t, **kw), (x, w, b))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, u: conv2d_relu(t, u, None, **kw), (xl, w))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(device, layout, requires_grad):
    x, w, b, _ = make_case((2, 4, 7, 6, 6, 3, 3, 2, 1, 2), torch.float32, device, layout, requires_grad=requires_grad)
    args = ([2, 2], [1, 1], 2)
    torch.library.opcheck(_ops.conv2d_relu_forward.default, (x, w, b) + args)
    torch.library.opcheck(_ops.conv2d_relu_forward.default, (x, w, None) + args)
    y = _ops.conv2d_relu_forward(x.detach(), w.detach(), b.detach(), *args)
    dy = torch.randn_like(y)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(_ops.conv2d_relu_backward.default, (dy, x.detach(), w.detach(), y) + args + (mask,))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    model = torch.nn.Sequential(alexnet_ext.nn.Conv2dReLU(3, 8, 3, stride=2, padding=1),
                                alexnet_ext.nn.Conv2dReLU(8, 6, 3, padding=1, groups=2)).to(device).double()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, device=device, requires_grad=True)
    check_compiled_matches_eager(model, x, wrt=list(model.parameters()))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_in_the_autocast_dtype_like_conv2d(device):
    dtype = torch.bfloat16
    x, w, b, kw = make_case((2, 6, 8, 8, 8, 3, 3, 1, 1, 2), torch.float32, device, "contiguous")
    with torch.autocast(device, dtype=dtype):
        y = conv2d_relu(x, w, b, **kw)
        want = F.relu(F.conv2d(x, w, b, **kw))
    assert want.dtype == dtype and y.dtype == dtype
    # Same bf16-rounded operands: the results differ only by accumulation order and the output rounding.
    assert_close_rel(y, want.detach().double().cpu(), REL_TOL[dtype], "output")
    gx, gw, gb = torch.autograd.grad(y.float().sum(), (x, w, b))
    assert gx.dtype == gw.dtype == gb.dtype == torch.float32
    rx, rw, rb = torch.autograd.grad(want.float().sum(), (x, w, b))
    for name, g, r in (("grad input", gx, rx), ("grad weight", gw, rw), ("grad bias", gb, rb)):
        assert_close_rel(g, r.double().cpu(), REL_TOL[dtype], name)
    # float64 is left alone by autocast, as for F.conv2d.
    x64, w64 = x.detach().double(), w.detach().double()
    with torch.autocast(device, dtype=dtype):
        assert conv2d_relu(x64, w64, None, **kw).dtype == F.conv2d(x64, w64, None, **kw).dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_under_torch_compile(device):
    torch._dynamo.reset()
    model = alexnet_ext.nn.Conv2dReLU(4, 6, 3, padding=1).to(device)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 4, 5, 5, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        got, want = compiled(x), model(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_and_relu_gradient_matches_threshold_backward(device):
    x, w, b, kw = make_case((1, 2, 5, 5, 3, 3, 3, 1, 1, 1), torch.float64, device, "contiguous")
    with torch.no_grad():
        x[0, 1, 2, 2] = float("nan")
    y = conv2d_relu(x, w, b, **kw)
    rx, rw, rb, ry = reference(x, w, b, kw)
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(ry)) and torch.isnan(ry).any()
    dy = torch.randn_like(ry)
    got = torch.autograd.grad(y, (x, w, b), dy.to(device))
    want = torch.autograd.grad(ry, (rx, rw, rb), dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r, equal_nan=True)
    # The mask itself: zero gradient exactly where y <= 0, NaN dy passes where y > 0.
    yy = torch.tensor([[[[-1.0, 0.0, 2.0, float("nan")]]]], dtype=torch.float64)
    gy = torch.tensor([[[[5.0, 5.0, float("nan"), 7.0]]]], dtype=torch.float64)
    xx = torch.zeros(1, 1, 1, 4, dtype=torch.float64)
    ww = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    dx, _, _ = _ops.conv2d_relu_backward(gy.to(device), xx.to(device), ww.to(device), yy.to(device), [1, 1], [0, 0],
                                         1, [True, False, False])
    torch.testing.assert_close(dx.cpu(), torch.ops.aten.threshold_backward(gy, yy, 0.0), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_memory_format_follows_input(device, layout):
    x, w, b, kw = make_case((2, 4, 6, 6, 6, 3, 3, 1, 1, 1), torch.float32, device, layout)
    y = conv2d_relu(x, w, b, **kw)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert gx.stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, w, b, kw = make_case((0, 4, 6, 6, 6, 3, 3, 1, 1, 2), torch.float32, device, "contiguous")
    y = conv2d_relu(x, w, b, **kw)
    assert y.shape == (0, 6, 6, 6)
    gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w)) and torch.equal(gb, torch.zeros_like(b))


def test_padding_strings():
    x, w, b, _ = make_case((1, 2, 6, 7, 3, 3, 5, 1, 0, 1), torch.float64, "cpu", "contiguous")
    for padding in ("same", "valid"):
        torch.testing.assert_close(conv2d_relu(x, w, b, padding=padding), F.relu(F.conv2d(x, w, b, padding=padding)))
    with pytest.raises(ValueError, match="`padding`"):
        conv2d_relu(x, w, b, stride=2, padding="same")


def test_bad_arguments_name_the_argument():
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(6, 2, 3, 3), torch.randn(6)
    with pytest.raises(ValueError, match="`input`"):
        conv2d_relu(torch.randn(4, 6, 6), w)
    with pytest.raises(ValueError, match="`weight`"):
        conv2d_relu(x, torch.randn(6, 4, 3))
    with pytest.raises(ValueError, match="`dilation`"):
        conv2d_relu(x, w, b, groups=2, dilation=2)
    with pytest.raises(ValueError, match="`groups`"):
        conv2d_relu(x, w, b, groups=0)
    with pytest.raises(ValueError, match="`stride`"):
        conv2d_relu(x, w, b, stride=(1, 2, 3), groups=2)
    with pytest.raises(TypeError, match="`bias`"):
        conv2d_relu(x, w, [1.0] * 6, groups=2)
    # The operator checks too, for callers that bypass the Python API.
    op = _ops.conv2d_relu_forward
    with pytest.raises(RuntimeError, match="`weight`.*`groups`.*`input` has 4"):
        op(x, w, b, [1, 1], [0, 0], 1)  # weight expects 2 channels per group
    with pytest.raises(RuntimeError, match="`input` has 4 channels, not divisible by `groups`"):
        op(x, torch.randn(6, 1, 3, 3), b, [1, 1], [0, 0], 3)
    with pytest.raises(RuntimeError, match="`bias`"):
        op(x, w, torch.randn(5), [1, 1], [0, 0], 2)
    with pytest.raises(RuntimeError, match="`stride`"):
        op(x, w, b, [0, 1], [0, 0], 2)
    with pytest.raises(RuntimeError, match="`padding`"):
        op(x, w, b, [1, 1], [-1, 0], 2)
    with pytest.raises(RuntimeError, match="`weight` has dtype"):
        op(x, w.double(), b, [1, 1], [0, 0], 2)
    with pytest.raises(RuntimeError, match="`bias` has dtype"):
        op(x, w, b.half(), [1, 1], [0, 0], 2)
    with pytest.raises(RuntimeError, match="`input`"):
        op(x.int(), w, b, [1, 1], [0, 0], 2)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        op(torch.randn(1, 4, 2, 2), w, b, [1, 1], [0, 0], 2)
    y = op(x, w, b, [1, 1], [0, 0], 2)
    with pytest.raises(RuntimeError, match="`grad_output`"):
        _ops.conv2d_relu_backward(y[:, :3], x, w, y, [1, 1], [0, 0], 2, [True, True, True])
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="`weight` is on"):
            op(x, w.cuda(), b, [1, 1], [0, 0], 2)


def test_module_is_a_drop_in_for_conv2d():
    ours = alexnet_ext.nn.Conv2dReLU(4, 6, 3, stride=2, padding=1, groups=2)
    theirs = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert isinstance(ours, torch.nn.Conv2d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    theirs.load_state_dict(ours.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(ours(x), F.relu(theirs(x)))
    assert alexnet_ext.nn.Conv2dReLU(4, 6, 3, bias=False).bias is None
    with pytest.raises(ValueError, match="`dilation`"):
        alexnet_ext.nn.Conv2dReLU(4, 6, 3, dilation=2)
    with pytest.raises(ValueError, match="`padding_mode`"):
        alexnet_ext.nn.Conv2dReLU(4, 6, 3, padding_mode="reflect")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer", list(ALEXNET))
def test_cuda_float32_exact_path_when_tf32_is_off(dtype, layer):
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        check_case(ALEXNET[layer], dtype, "cuda", "channels_last")
    finally:
        torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------------------
# Backward preparation (one pass: ReLU mask, padded NHWC dym, bias-gradient
# partial sums): dy and y read where they lie, in every layout combination.

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dy_layout,y_layout", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                                ("contiguous", "channels_last"), ("channels_last", "permuted"),
                                                ("permuted", "contiguous")])
@pytest.mark.parametrize("want_bias", [True, False])
@pytest.mark.parametrize("case", [(2, 6, 7, 9, 10, 3, 3, 1, 1, 2), (1, 5, 9, 7, 7, 3, 3, 2, 0, 1),
                                  (2, 16, 5, 5, 16, 1, 1, 1, 0, 1)], ids=lambda c: "x".join(map(str, c[:5])))
def test_backward_relu_mask_from_saved_output_in_any_layout(device, dtype, dy_layout, y_layout, want_bias, case):
    """The backward op against threshold_backward + torch.nn.grad in float64
    for a given saved output y (negative, zero, positive and NaN values: the
    gradient passes where y is NaN) and dy (NaN where y <= 0, which the mask
    must block, not multiply by 0): groups, channel counts that need padding
    (10/2 = 5, 7), 1x1 kernels, NCHW, NHWC, mixed and non-contiguous dy/y."""
    n, c, h, w_, k, r, s, stride, padding, groups = case
    x, w, _, kw = make_case(case, dtype, device, "contiguous", bias=False, requires_grad=False)
    p = (h + 2 * padding - r) // stride + 1
    q = (w_ + 2 * padding - s) // stride + 1
    y = torch.randn(n, k, p, q, dtype=torch.float64)
    y[y.abs() < 0.3] = 0.0
    y.view(-1)[::11] = float("nan")
    gy = torch.randn(n, k, p, q, dtype=torch.float64)
    blocked = (y <= 0) & (torch.rand(y.shape) < 0.3)
    assert blocked.any()
    gy[blocked] = float("nan")
    y, gy = y.to(dtype), gy.to(dtype)
    dx, dw, db = _ops.conv2d_relu_backward(with_layout(gy.to(device), dy_layout), x, w, with_layout(y.to(device), y_layout),
                                           [stride] * 2, [padding] * 2, groups, [True, True, want_bias])
    dym = torch.ops.aten.threshold_backward(gy.double(), y.double(), 0.0)
    assert not dym.isnan().any() and (dym[y.isnan()] != 0).all()
    x64, w64 = x.detach().double().cpu(), w.detach().double().cpu()
    tol = rel_tol(dtype, device)
    assert_close_rel(dx, torch.nn.grad.conv2d_input(x64.shape, w64, dym, stride, padding, groups=groups), tol, "dx")
    assert_close_rel(dw, torch.nn.grad.conv2d_weight(x64, w64.shape, dym, stride, padding, groups=groups), tol, "dw")
    if want_bias:
        assert_close_rel(db, dym.sum((0, 2, 3)), tol, "db")
    else:
        assert db.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bias_gradient_over_many_row_tiles(device, layout):
    """Enough output pixels (33,856) that each of the bias gradient's 128 row
    ranges spans several 32-row tiles on the CUDA path, with K = 12 padded
    to 16 per group in bfloat16 (two groups)."""
    check_case((1, 8, 184, 184, 12, 1, 1, 1, 0, 2), torch.bfloat16, device, layout)


# ---------------------------------------------------------------------------
# Packed-weight cache (csrc/conv/weight_cache.h). The CUDA path packs the
# weight through it; _conv2d_relu_packed_weight runs the same packing and
# cache on any device, so these run on the CPU.

CACHE_FIELDS = ("enabled", "hits", "misses", "skips", "entries", "bytes")
PACK_KINDS = {"krsc": 0, "folded": 1, "dgrad": 2}


@pytest.fixture
def weight_cache():
    """An enabled, empty cache with zeroed counters; returns a stats reader.
    The caller's on/off setting is restored after."""
    enabled = _ops._conv2d_relu_weight_cache()[0]
    _ops._conv2d_relu_weight_cache(1, True)
    yield lambda: dict(zip(CACHE_FIELDS, _ops._conv2d_relu_weight_cache()))
    _ops._conv2d_relu_weight_cache(enabled, True)


def reference_pack(w, groups, vec, kind):
    """The packings of conv_math.h's layouts, written out in torch."""
    w = w.detach()
    k, cg, r, s = w.shape
    up = lambda v, m: -(-v // m) * m
    kg, cgp, kgp = k // groups, up(cg, vec), up(k // groups, vec)
    if kind == "folded":
        run = w.permute(0, 2, 3, 1).reshape(k, r, s * cg)
        return F.pad(run, (0, up(s * cg, 4) - s * cg, 0, 0, 0, kgp - k)).reshape(kgp, -1)
    krsc = F.pad(w.permute(0, 2, 3, 1).reshape(groups, kg, r, s, cg), (0, cgp - cg, 0, 0, 0, 0, 0, kgp - kg))
    if kind == "dgrad":
        return krsc.permute(0, 4, 2, 3, 1)
    return krsc.reshape(groups * kgp, r, s, cgp)


def pack(w, kind, groups=1, vec=8):
    return _ops._conv2d_relu_packed_weight(w, groups, vec, PACK_KINDS[kind])


def assert_packs(w, kind, groups=1, vec=8):
    got = pack(w, kind, groups, vec)
    want = reference_pack(w, groups, vec, kind)
    assert got.shape == want.shape and got.dtype == w.dtype
    torch.testing.assert_close(got.reshape(want.shape), want, rtol=0, atol=0, equal_nan=True, msg=kind)
    return got


@pytest.mark.parametrize("kind,groups", [("krsc", 1), ("krsc", 2), ("dgrad", 2), ("folded", 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_cache_hit_returns_the_same_packing(weight_cache, kind, groups, dtype):
    w = random_input((10, 3, 5, 3), dtype, "cpu", requires_grad=True)
    first = assert_packs(w, kind, groups)
    misses = weight_cache()["misses"]
    again = assert_packs(w, kind, groups)
    stats = weight_cache()
    assert stats["hits"] == 1 and stats["misses"] == misses
    assert again.data_ptr() == first.data_ptr()


def _sgd(w):
    w.grad = torch.randn_like(w)
    torch.optim.SGD([w], lr=0.1, momentum=0.9).step()


def _adam_fused(w):
    w.grad = torch.randn_like(w)
    torch.optim.Adam([w], lr=0.1, fused=True).step()


def _no_grad(fn):
    def run(w):
        with torch.no_grad():
            fn(w)
    return run


IN_PLACE_UPDATES = {
    "add_": _no_grad(lambda w: w.add_(1.0)),
    "copy_": _no_grad(lambda w: w.copy_(torch.randn_like(w))),
    "detach-mul_": lambda w: w.detach().mul_(-2.0),
    "slice-view": _no_grad(lambda w: w[1:3].zero_()),
    "sgd-step": _sgd,
    "set-data": lambda w: setattr(w, "data", torch.randn_like(w)),
}


@pytest.mark.parametrize("update", list(IN_PLACE_UPDATES))
@pytest.mark.parametrize("kind", ["krsc", "dgrad"])
def test_weight_cache_in_place_update_invalidates(weight_cache, update, kind):
    w = random_input((8, 4, 3, 3), torch.float32, "cpu", requires_grad=True)
    before = assert_packs(w, kind).clone()
    IN_PLACE_UPDATES[update](w)
    after = assert_packs(w, kind)
    assert not torch.equal(after, before)
    assert weight_cache()["hits"] == 0


def test_weight_cache_drops_a_weight_whose_gradient_was_computed(weight_cache):
    """Writes the version counter does not see (`.data`, fused optimizers)
    follow a backward in training: that backward drops the weight's entries."""
    x, w, b, kw = make_case((2, 4, 6, 6, 8, 3, 3, 1, 1, 1), torch.float32, "cpu", "contiguous")
    assert_packs(w, "krsc")
    assert_packs(w, "dgrad")  # (built from the cached KRSC: a hit)
    y = conv2d_relu(x, w, b, **kw)
    y.backward(torch.randn_like(y))
    assert weight_cache()["entries"] == 0
    version, hits = w._version, weight_cache()["hits"]
    _adam_fused(w)
    w.data.add_(1.0)
    assert w._version == version  # neither write is seen by the version counter ...
    assert_packs(w, "krsc")       # ... and the packing is still the current one
    assert weight_cache()["hits"] == hits


def test_weight_cache_under_no_grad_and_inference_mode(weight_cache):
    w = random_input((8, 4, 3, 3), torch.bfloat16, "cpu", requires_grad=True)
    with torch.no_grad():
        first = assert_packs(w, "krsc")
        assert assert_packs(w, "krsc").data_ptr() == first.data_ptr()
    with torch.inference_mode():
        # A normal tensor keeps its version counter in inference mode.
        assert assert_packs(w, "krsc").data_ptr() == first.data_ptr()
        w.data.copy_(torch.randn_like(w))  # (not tracked: `.data`) ...
        with torch.no_grad():
            w.mul_(3.0)                    # ... but this is
        assert_packs(w, "krsc")
        # Inference tensors have no version counter: packed, never cached.
        wi = torch.randn(8, 4, 3, 3, dtype=torch.bfloat16)
        assert wi.is_inference()
        skips = weight_cache()["skips"]
        assert_packs(wi, "krsc")
        assert_packs(wi, "dgrad")
    stats = weight_cache()
    assert stats["hits"] == 2 and stats["skips"] >= skips + 2 and stats["entries"] == 1


def test_weight_cache_keys_dtype_shape_and_strides_of_one_storage(weight_cache):
    """The same parameter re-pointed (`.data =`) to another dtype, shape or
    layout never gets its old packing; views of one storage (other dtypes,
    shapes, strides) are not cached at all: another tensor on the storage
    could write it unseen by the weight's version counter."""
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    assert_packs(p, "krsc")
    # (no other reference to the new tensors: a live alias would turn caching off)
    for make in (lambda: p.data.double(), lambda: torch.randn(8, 2, 3, 3),
                 lambda: p.data.contiguous(memory_format=torch.channels_last).add(1)):
        p.data = make()
        assert_packs(p, "krsc")
    assert assert_packs(p, "krsc", vec=4).shape == (8, 3, 3, 4)  # another padding of the same weight
    assert weight_cache()["hits"] == 0 and weight_cache()["misses"] == 5
    base = torch.randn(8 * 4 * 3 * 3)
    skips = weight_cache()["skips"]
    for view in (base.view(8, 4, 3, 3), base.view(4, 8, 3, 3), base.view(torch.bfloat16).view(8, 4, 3, 6),
                 base.view(8, 4, 3, 3).transpose(2, 3)):
        assert_packs(view, "krsc")
        assert_packs(view, "krsc")
    assert weight_cache()["skips"] == skips + 8 and weight_cache()["hits"] == 0


def test_weight_cache_does_not_keep_dead_weights(weight_cache):
    import gc
    w = torch.nn.Parameter(torch.randn(8, 4, 3, 3))
    pack(w, "krsc")
    assert weight_cache()["entries"] == 1 and weight_cache()["bytes"] == 8 * 3 * 3 * 8 * 4
    del w
    gc.collect()
    assert weight_cache()["entries"] == 0 and weight_cache()["bytes"] == 0


def test_weight_cache_switch(weight_cache):
    w = random_input((8, 4, 3, 3), torch.float32, "cpu")
    assert_packs(w, "krsc")
    assert _ops._conv2d_relu_weight_cache(0)[CACHE_FIELDS.index("entries")] == 0
    a, b = assert_packs(w, "krsc"), assert_packs(w, "krsc")
    assert a.data_ptr() != b.data_ptr() and weight_cache()["hits"] == 0
    with pytest.raises(RuntimeError, match="`enable`"):
        _ops._conv2d_relu_weight_cache(2)


def test_weight_cache_env_switch():
    """Opt-in: writes through `.data` between two forwards are not seen."""
    import subprocess
    import sys
    code = "import torch, alexnet_ext; print(torch.ops.alexnet_ext._conv2d_relu_weight_cache()[0])"
    import os
    base = {k: v for k, v in os.environ.items() if k != "ALEXNET_EXT_CONV_WEIGHT_CACHE"}
    for value, want in ((None, "0"), ("0", "0"), ("off", "0"), ("1", "1")):  # off unless set
        env = base if value is None else dict(base, ALEXNET_EXT_CONV_WEIGHT_CACHE=value)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == want


def test_weight_cache_is_thread_safe(weight_cache):
    import threading
    failures = []

    def worker(seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(16, 8, 3, 3, generator=g)
        try:
            for i in range(40):
                if i % 3 == 0:
                    with torch.no_grad():
                        w.add_(torch.randn(w.shape, generator=g))
                for kind in ("krsc", "dgrad"):
                    if not torch.equal(pack(w, kind).reshape(-1), reference_pack(w, 1, 8, kind).reshape(-1)):
                        failures.append((seed, i, kind))
        except Exception as e:  # noqa: BLE001 (reported below)
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    assert weight_cache()["hits"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64_with_the_weight_cache_on(weight_cache, device):
    """gradcheck perturbs the weight through a `.data` alias (no version
    bump): the cache must not serve the unperturbed packing."""
    test_gradcheck_float64(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cached_weight_follows_training_and_evaluation(weight_cache, device, layout):
    """The op itself across evaluation calls (hits where the CUDA path packs),
    in-place updates and training steps (SGD, fused Adam) always computes
    with the current weight, forward and input gradient (dgrad's packing)."""
    x, w, b, kw = make_case((2, 8, 7, 7, 16, 3, 3, 1, 1, 2), torch.float32, device, layout)
    tol = rel_tol(torch.float32, device)

    def check(grad=False):
        y = conv2d_relu(x, w, b, **kw)
        rx, rw, rb, ry = reference(x, w, b, kw)
        assert_close_rel(y, ry.detach(), tol, "output")
        if grad:
            g = torch.randn(ry.shape, dtype=torch.float64)
            (gx,) = torch.autograd.grad(y, x, g.float().to(device), retain_graph=True)
            assert_close_rel(gx, torch.autograd.grad(ry, rx, g * ~(y.detach().double().cpu() <= 0))[0], tol, "grad input")
        return y

    with torch.no_grad():
        check()
        check()
    packs_weights = weight_cache()["misses"] > 0  # the CUDA path (also under the emulator)
    assert weight_cache()["hits"] == (1 if packs_weights else 0)
    with torch.no_grad():
        w.mul_(-1.0)
    check(grad=True)
    for step in (_sgd, _adam_fused):
        y = check(grad=True)
        y.backward(torch.randn_like(y))
        step(w)
        check(grad=True)
