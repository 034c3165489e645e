"""Overlapping max-pool against torch.nn.functional.max_pool2d."""

import pytest
import torch
import torch.nn.functional as F

import alexnet_ext
from alexnet_ext.functional import max_pool2d
from op_testing import (DEVICES, DTYPES, LAYOUTS, check_against_reference, check_compiled_matches_eager, random_input,
                        requires_cuda, with_layout)

# (shape, kernel_size, stride, padding, ceil_mode): kernels 1..5 (and a
# non-square one), strides 1..3, padding 0..k//2, ceil_mode both ways, odd
# and even sizes, 3D inputs. A sample of the cartesian product that still
# covers every value of each parameter, and ceil_mode windows that get
# clipped (or dropped) at the bottom/right edge.
CASES = [
    ((2, 3, 9, 9), 3, 2, 0, False),  # AlexNet's window
    ((2, 3, 10, 9), 3, 2, 1, True),
    ((2, 4, 8, 8), 2, 2, 0, False),
    ((1, 3, 7, 6), 2, 1, 1, True),
    ((2, 2, 11, 10), 4, 3, 2, True),
    ((2, 3, 6, 7), 1, 1, 0, False),
    ((1, 2, 5, 5), 1, 2, 0, True),
    ((2, 3, 12, 11), 5, 3, 2, False),
    ((1, 4, 9, 8), 5, 2, 1, True),
    ((2, 2, 7, 9), (2, 3), (1, 2), (1, 0), True),
    ((3, 8, 8), 3, 2, 1, False),  # (C, H, W)
    ((3, 5, 7), 3, 3, 0, True),
    # Enough channels for the channels_last CPU kernel's full register blocks
    # (32 float / 16 double channels) and a partial one after them.
    ((2, 80, 9, 8), 3, 2, 1, True),
    ((1, 72, 7, 7), 3, 2, 0, False),
]
CASE_IDS = [f"{'x'.join(map(str, c[0]))}-k{c[1]}-s{c[2]}-p{c[3]}-{'ceil' if c[4] else 'floor'}" for c in CASES]


def pool_pair(kernel_size, stride, padding, ceil_mode):
    ours = lambda t: max_pool2d(t, kernel_size, stride, padding, ceil_mode)  # noqa: E731
    ref = lambda t: F.max_pool2d(t, kernel_size, stride, padding, ceil_mode=ceil_mode)  # noqa: E731
    return ours, ref


def assert_indices_match(x, kernel_size, stride, padding, ceil_mode):
    _, ours = max_pool2d(x, kernel_size, stride, padding, ceil_mode, return_indices=True)
    _, ref = F.max_pool2d(x.detach().double().cpu(), kernel_size, stride, padding, ceil_mode=ceil_mode,
                          return_indices=True)
    assert ours.dtype == torch.int64
    assert torch.equal(ours.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,kernel_size,stride,padding,ceil_mode", CASES, ids=CASE_IDS)
def test_matches_torch_forward_and_backward(device, dtype, layout, shape, kernel_size, stride, padding, ceil_mode):
    x = random_input(shape, dtype, device, layout, requires_grad=True)
    ours, ref = pool_pair(kernel_size, stride, padding, ceil_mode)
    check_against_reference(ours, ref, [x], dtype)
    assert_indices_match(x, kernel_size, stride, padding, ceil_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [0, 1, 4, 8, 9, 12, 13], ids=[CASE_IDS[i] for i in (0, 1, 4, 8, 9, 12, 13)])
def test_many_ties_first_maximum_wins(device, dtype, layout, case):
    # Small integers: most windows hold several equal maxima, and the gradient
    # must land on the same one PyTorch picks (the first in row-major order).
    shape, kernel_size, stride, padding, ceil_mode = CASES[case]
    x = with_layout(torch.randint(-2, 3, shape, dtype=dtype, device=device), layout).requires_grad_()
    ours, ref = pool_pair(kernel_size, stride, padding, ceil_mode)
    check_against_reference(ours, ref, [x], dtype)
    assert_indices_match(x, kernel_size, stride, padding, ceil_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [0, 3, 7, 12], ids=[CASE_IDS[i] for i in (0, 3, 7, 12)])
def test_nan_and_inf_propagate_like_torch(device, dtype, layout, case):
    # NaNs (several per window: PyTorch keeps the last one), +-inf, and
    # windows where everything is -inf (PyTorch points at the first element).
    shape, kernel_size, stride, padding, ceil_mode = CASES[case]
    x = torch.randint(-2, 3, shape, dtype=torch.float64)
    flat = x.view(-1)
    n = flat.numel()
    flat[torch.randperm(n)[: n // 8]] = float("nan")
    flat[torch.randperm(n)[: n // 10]] = float("inf")
    flat[torch.randperm(n)[: n // 4]] = float("-inf")
    x[0, 0] = float("-inf")
    x = with_layout(x.to(dtype).to(device), layout).requires_grad_()
    ours, ref = pool_pair(kernel_size, stride, padding, ceil_mode)
    out = check_against_reference(ours, ref, [x], dtype)
    assert torch.isnan(out).any()
    assert_indices_match(x, kernel_size, stride, padding, ceil_mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,shape", [("contiguous", (2, 96, 55, 55)), ("channels_last", (8, 96, 55, 55))],
                         ids=["nchw", "channels_last"])
def test_alexnet_pool1_long_column_walks(device, dtype, layout, shape):
    # Enough columns of outputs that the CUDA forward walks 3 output rows per
    # segment (each step reusing the row above), not 1 as at small shapes;
    # ties and NaNs cross the rows the walk carries over.
    x = torch.randint(-2, 3, shape, dtype=torch.float64)
    x.view(-1)[torch.randperm(x.numel())[:50]] = float("nan")
    x = with_layout(x.to(dtype).to(device), layout).requires_grad_()
    check_against_reference(lambda t: max_pool2d(t, 3, 2), lambda t: F.max_pool2d(t, 3, 2), [x], dtype)
    assert_indices_match(x, 3, 2, 0, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_large_window_uses_int32_offsets(device, layout):
    # 17x17 = 289 window elements do not fit a uint8 offset.
    x = random_input((2, 3, 21, 20), torch.float32, device, layout, requires_grad=True)
    ours, ref = pool_pair(17, 2, 8, True)
    check_against_reference(ours, ref, [x], torch.float32)
    assert_indices_match(x, 17, 2, 8, True)
    _, argmax = torch.ops.alexnet_ext.max_pool2d_forward(x, [17, 17], [2, 2], [8, 8], True, True)
    assert argmax.dtype == torch.int32


@pytest.mark.parametrize("kernel_size,offset_dtype", [(3, torch.uint8), (16, torch.uint8), (17, torch.int32)])
def test_backward_saves_only_the_window_offsets(kernel_size, offset_dtype):
    x = torch.randn(2, 3, 40, 40, requires_grad=True)
    y = max_pool2d(x, kernel_size, 2)
    saved = y.grad_fn.saved_tensors
    assert [(t.dtype, t.shape) for t in saved] == [(offset_dtype, y.shape)]
    if kernel_size == 3:  # 8x less than PyTorch's int64 indices for AlexNet's window
        theirs = F.max_pool2d(x, 3, 2).grad_fn._saved_result1  # the int64 indices
        assert theirs.dtype == torch.int64 and theirs.nbytes == 8 * saved[0].nbytes


class RecordingOps:
    """Stands in for torch.ops.alexnet_ext and records each call's arguments."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        op = getattr(torch.ops.alexnet_ext, name)

        def call(*args):
            self.calls.append((name, args))
            return op(*args)
        return call


@pytest.mark.parametrize("device", DEVICES)
def test_argmax_written_only_when_needed(device, monkeypatch):
    ops = RecordingOps()
    monkeypatch.setattr(alexnet_ext.functional, "_ops", ops)
    x = torch.randn(2, 3, 9, 9, device=device)
    xg = x.clone().requires_grad_()
    max_pool2d(x, 3, 2)
    with torch.no_grad():
        max_pool2d(xg, 3, 2)
    max_pool2d(x, 3, 2, return_indices=True)
    max_pool2d(xg, 3, 2)
    assert [args[-1] for name, args in ops.calls] == [False, False, True, True]
    _, argmax = torch.ops.alexnet_ext.max_pool2d_forward(x, [3, 3], [2, 2], [0, 0], False, False)
    assert argmax.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_return_indices_feed_max_unpool2d(device):
    x = random_input((2, 4, 9, 11), torch.float32, device, "channels_last")
    out, idx = max_pool2d(x, 3, 2, 1, return_indices=True)
    ref_out, ref_idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(F.max_unpool2d(out, idx, 3, 2, 1, output_size=x.shape[-2:]),
                               F.max_unpool2d(ref_out, ref_idx, 3, 2, 1, output_size=x.shape[-2:]))
    out3, idx3 = max_pool2d(x[0], 3, 2, 1, return_indices=True)
    assert torch.equal(out3, ref_out[0]) and torch.equal(idx3, ref_idx[0])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    for kernel_size, stride, padding, ceil_mode, layout in [(3, 2, 0, False, "contiguous"), (3, 2, 1, True, "channels_last"),
                                                            (2, 1, 1, False, "permuted"), ((3, 2), (2, 3), (1, 1), True, "contiguous")]:
        x = random_input((2, 3, 7, 8), torch.float64, device, layout, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: max_pool2d(t, kernel_size, stride, padding, ceil_mode), (x,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("save_argmax", [False, True])
def test_opcheck(device, layout, save_argmax):
    x = random_input((2, 3, 9, 8), torch.float32, device, layout, requires_grad=save_argmax)
    window = ([3, 3], [2, 2], [1, 1], True)
    torch.library.opcheck(torch.ops.alexnet_ext.max_pool2d_forward.default, (x, *window, save_argmax))
    if save_argmax:
        y, argmax = torch.ops.alexnet_ext.max_pool2d_forward(x.detach(), *window, True)
        dy = with_layout(torch.randn(y.shape, device=device), layout)
        torch.library.opcheck(torch.ops.alexnet_ext.max_pool2d_backward.default,
                              (dy, argmax, list(x.shape), *window))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                alexnet_ext.nn.MaxPool2d(3, 2, ceil_mode=True))
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64, device=device, requires_grad=True)
    compiled, eager_out = check_compiled_matches_eager(model.to(device).double(), x)
    with torch.no_grad():  # the no-argmax forward traces too
        torch.testing.assert_close(compiled(x), eager_out)


@pytest.mark.parametrize("device", DEVICES)
def test_output_keeps_memory_format(device):
    for layout in ["contiguous", "channels_last"]:
        x = random_input((2, 6, 9, 8), torch.float32, device, layout, requires_grad=True)
        y = max_pool2d(x, 3, 2)
        assert y.stride() == F.max_pool2d(x, 3, 2).stride()
        (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
        assert gx.stride() == x.stride()


@pytest.mark.parametrize("device", DEVICES)
def test_strided_views(device):
    # Sliced (not just permuted) storage takes the contiguous copy path.
    base = torch.randn(3, 8, 15, 14, device=device, dtype=torch.float64)
    x = base[::2, 1::2, 1:, ::2].requires_grad_()
    check_against_reference(lambda t: max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1), [x], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 7, 7), (2, 0, 7, 7), (0, 7, 7)])
def test_empty_tensors(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y, idx = max_pool2d(x, 3, 2, return_indices=True)
    assert y.shape == idx.shape == shape[:-2] + (3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 4, 7, 7)
    cases = [
        (ValueError, "`dilation`", dict(kernel_size=3, dilation=2)),
        (ValueError, "`padding`", dict(kernel_size=3, padding=2)),
        (ValueError, "`padding`", dict(kernel_size=3, padding=-1)),
        (ValueError, "`kernel_size`", dict(kernel_size=0)),
        (ValueError, "`stride`", dict(kernel_size=3, stride=0)),
        (ValueError, "`kernel_size`", dict(kernel_size=(3, 3, 3))),
        (TypeError, "`stride`", dict(kernel_size=3, stride=1.5)),
    ]
    for error, name, kwargs in cases:
        with pytest.raises(error, match=name):
            max_pool2d(x, **kwargs)
    with pytest.raises(ValueError, match="`input`"):
        max_pool2d(torch.randn(2, 3, 4, 5, 6))
    with pytest.raises(RuntimeError, match="`input`"):
        max_pool2d(torch.ones(2, 4, 7, 7, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="too small"):
        max_pool2d(torch.randn(1, 2, 2, 2), 3)
    with pytest.raises(RuntimeError, match="`input` must have a non-zero height"):
        max_pool2d(torch.randn(1, 2, 0, 5), 1, 1)
    # The operators check too, for callers that bypass the Python API.
    ops = torch.ops.alexnet_ext
    with pytest.raises(RuntimeError, match="`padding`"):
        ops.max_pool2d_forward(x, [3, 3], [2, 2], [2, 0], False, False)
    with pytest.raises(RuntimeError, match="`stride`"):
        ops.max_pool2d_forward(x, [3, 3], [0, 2], [0, 0], False, False)
    y, argmax = ops.max_pool2d_forward(x, [3, 3], [2, 2], [0, 0], False, True)
    with pytest.raises(RuntimeError, match="`argmax`"):
        ops.max_pool2d_backward(y, argmax.int(), list(x.shape), [3, 3], [2, 2], [0, 0], False)
    with pytest.raises(RuntimeError, match="`argmax`"):
        ops.max_pool2d_backward(y, argmax, [2, 4, 9, 9], [3, 3], [2, 2], [0, 0], False)
    with pytest.raises(RuntimeError, match="`grad_output`"):
        ops.max_pool2d_backward(y[:, :, :2], argmax, list(x.shape), [3, 3], [2, 2], [0, 0], False)


def test_module_is_a_drop_in_for_torch():
    ours = alexnet_ext.nn.MaxPool2d()
    theirs = torch.nn.MaxPool2d(3, 2)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, torch.nn.MaxPool2d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 5, 11, 11, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))
    ours = alexnet_ext.nn.MaxPool2d(2, stride=None, padding=1, ceil_mode=True, return_indices=True)
    theirs = torch.nn.MaxPool2d(2, padding=1, ceil_mode=True, return_indices=True)
    assert repr(ours) == repr(theirs)
    for a, b in zip(ours(x), theirs(x)):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="`dilation`"):
        alexnet_ext.nn.MaxPool2d(3, 2, dilation=2)(x)


def test_pool_math_output_size_matches_torch():
    # The fake kernel's size formula (a copy of pooled_size() in pool_math.h,
    # which the operator checks use) against PyTorch over a grid of sizes.
    from alexnet_ext.ops.maxpool import pooled_size
    for size in range(1, 12):
        for k in range(1, 6):
            for s in range(1, 4):
                for p in range(0, k // 2 + 1):
                    for ceil_mode in (False, True):
                        if pooled_size(size, k, s, p, ceil_mode) < 1:
                            continue
                        x = torch.zeros(1, 1, size, 1)
                        want = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=ceil_mode).shape[2]
                        assert pooled_size(size, k, s, p, ceil_mode) == want
                        assert max_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode).shape[2] == want


# ---------------------------------------------------------------- CUDA only

CUDA_SHAPES = [
    ((3, 70, 27, 27), 3, 2, 0, False),  # AlexNet fast path, several planes per block
    ((2, 5, 55, 55), 3, 2, 0, True),  # fast path, ceil_mode clips the last window
    ((2, 3, 130, 150), 3, 2, 0, False),  # plane too large for shared memory: general path
    ((2, 6, 17, 19), 3, 2, 1, False),  # padding: general path
    ((2, 4, 13, 12), (2, 4), (3, 1), (1, 2), True),
    ((1, 3, 21, 20), 17, 2, 8, True),  # int32 offsets
]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,kernel_size,stride,padding,ceil_mode", CUDA_SHAPES)
def test_cuda_matches_cpu(dtype, layout, shape, kernel_size, stride, padding, ceil_mode):
    # Small integers make ties everywhere; maxima are exact, so forward and
    # indices must agree bit for bit, and gradients up to summation rounding.
    x = torch.randint(-3, 4, shape).to(dtype)
    x.view(-1)[torch.randperm(x.numel())[:7]] = float("nan")
    x = with_layout(x, layout).requires_grad_()
    xc = x.detach().cuda().requires_grad_()
    args = (kernel_size, stride, padding, ceil_mode)
    y, idx = max_pool2d(x, *args, return_indices=True)
    yc, idxc = max_pool2d(xc, *args, return_indices=True)
    assert yc.stride() == y.stride()
    torch.testing.assert_close(yc.cpu(), y, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(idxc.cpu(), idx)
    g = torch.randn(y.shape, dtype=torch.float64).to(dtype)
    (gh,) = torch.autograd.grad(y, x, g)
    (gc,) = torch.autograd.grad(yc, xc, g.cuda())
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    if dtype in (torch.float16, torch.bfloat16):
        tol = dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gc.cpu().double(), gh.double(), **tol)


@pytest.mark.cuda
@requires_cuda
def test_cuda_no_grad_forward_matches_cpu():
    x = torch.randn(4, 64, 55, 55)
    torch.testing.assert_close(max_pool2d(x.cuda(), 3, 2).cpu(), max_pool2d(x, 3, 2), rtol=0, atol=0)
