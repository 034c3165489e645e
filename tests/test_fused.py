"""Fused LRN + max-pool against the unfused pair
max_pool2d(local_response_norm(x)): torch.nn.functional's in float64, and
our own two operators in every dtype."""
import pytest
import torch
import torch.nn.functional as F

import alexnet_ext
from alexnet_ext.functional import local_response_norm, local_response_norm_max_pool2d, max_pool2d
from alexnet_ext.ops.maxpool import flat_indices
from op_testing import (DEVICES, DTYPES, LAYOUTS, check_against_reference, check_compiled_matches_eager, random_input,
                        tolerance)

_ops = torch.ops.alexnet_ext

# (shape, lrn size, kernel_size, stride, padding, ceil_mode): AlexNet's 3x3/2,
# padding and ceil_mode, non-overlapping and rectangular windows, even and
# wide LRN windows, C smaller than the LRN window.
CASES = [
    ((2, 12, 13, 13), 5, 3, 2, 0, False),
    ((2, 7, 12, 11), 5, 3, 2, 0, True),
    ((1, 9, 10, 9), 3, 3, 2, 1, True),
    ((2, 6, 8, 8), 4, 2, 2, 0, False),
    ((1, 5, 9, 7), 7, (3, 2), (1, 2), (1, 0), False),
    ((2, 3, 7, 7), 5, 3, 1, 1, False),
    ((1, 8, 11, 6), 2, (2, 3), (3, 1), 0, True),
]
# Planes the CPU's unpadded 3x3/2 fast path splits by row and column parity:
# odd (AlexNet's 27x27) and even sides.
FAST_PATH_CASES = [
    ((1, 6, 27, 27), 5, 3, 2, 0, False),
    ((2, 5, 14, 16), 5, 3, 2, 0, False),
]
CASES += FAST_PATH_CASES
HP = dict(alpha=0.5, beta=0.75, k=1.5)


def fused(x, size, kernel_size, stride, padding, ceil_mode, hp=HP):
    return local_response_norm_max_pool2d(x, size, hp["alpha"], hp["beta"], hp["k"], kernel_size, stride, padding,
                                          ceil_mode)


def torch_pair(x, size, kernel_size, stride, padding, ceil_mode, hp=HP):
    return F.max_pool2d(F.local_response_norm(x, size, **hp), kernel_size, stride, padding, ceil_mode=ceil_mode)


def our_pair(x, size, kernel_size, stride, padding, ceil_mode, hp=HP):
    return max_pool2d(local_response_norm(x, size, **hp), kernel_size, stride, padding, ceil_mode)


def fused_indices(x, size, kernel_size, stride, padding, ceil_mode, hp=HP):
    """The fused op's argmax as PyTorch's flat indices (h * W + w per plane)."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    kernel_size, stride, padding = pair(kernel_size), pair(stride), pair(padding)
    out, argmax = _ops.lrn_max_pool2d_forward(x, size, hp["alpha"], hp["beta"], hp["k"], list(kernel_size),
                                              list(stride), list(padding), ceil_mode, True)
    return out, flat_indices(argmax, x.shape[-1], kernel_size, stride, padding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES)
def test_float64_equals_torch_pair(device, layout, case):
    shape, *window = case
    x = random_input(shape, torch.float64, device, layout, scale=2.0, requires_grad=True)
    out = check_against_reference(lambda t: fused(t, *window), lambda t: torch_pair(t, *window), [x], torch.float64)
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    # The maximum of every window is the element the unfused pair picks.
    _, ours = fused_indices(x.detach(), *window)
    _, ref = F.max_pool2d(F.local_response_norm(x.detach().cpu(), window[0], **HP), *window[1:3],
                          padding=window[3], ceil_mode=window[4], return_indices=True)
    assert torch.equal(ours.cpu(), ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES[:3] + FAST_PATH_CASES)
def test_every_dtype_equals_our_pair(device, dtype, layout, case):
    # Reduced precision: the pool compares LRN outputs rounded to the dtype,
    # so the float64 reference may pick another element of a near-tie; our
    # own pair in the same dtype picks exactly the same ones.
    shape, *window = case
    x = random_input(shape, dtype, device, layout, scale=2.0, requires_grad=True)
    out = fused(x, *window)
    ref_x = x.detach().clone().requires_grad_()
    ref = our_pair(ref_x, *window)
    assert out.dtype == dtype and out.stride() == ref.stride()
    torch.testing.assert_close(out, ref, **tolerance(dtype))
    with torch.no_grad():
        torch.testing.assert_close(out.double().cpu(), torch_pair(x.detach().double().cpu(), *window),
                                   **tolerance(dtype))
    upstream = torch.randn(out.shape, dtype=torch.float64).to(dtype).to(device)
    (got,) = torch.autograd.grad(out, x, upstream)
    (want,) = torch.autograd.grad(ref, ref_x, upstream)
    assert got.dtype == dtype and got.stride() == x.stride() or layout == "permuted"
    torch.testing.assert_close(got.double(), want.double(), **tolerance(dtype, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 96, 55, 55), (2, 256, 27, 27)])
def test_host_kernels_bit_equal_to_our_pair(dtype, layout, shape):
    # The CPU kernels of the fused op and of our LRN sum the same rounded
    # squares in the same order (setup.py builds without FMA contraction),
    # so the LRN values and the pooled maxima are identical bit for bit, not
    # merely close, and the maxima sit at the same positions.
    x = random_input(shape, dtype, "cpu", layout, scale=3.0, requires_grad=True)
    out = local_response_norm_max_pool2d(x, 5, 1e-4, 0.75, 2.0)
    ref_x = x.detach().clone().requires_grad_()
    ref = max_pool2d(local_response_norm(ref_x, 5, 1e-4, 0.75, 2.0), 3, 2)
    assert torch.equal(out, ref)
    upstream = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    (got,) = torch.autograd.grad(out, x, upstream)
    (want,) = torch.autograd.grad(ref, ref_x, upstream)
    torch.testing.assert_close(got, want, **tolerance(dtype, 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_alexnet_hyper_parameters(device, layout):
    # AlexNet's setting (beta = 0.75: the rsqrt path), float32.
    x = random_input((2, 48, 13, 13), torch.float32, device, layout, scale=3.0, requires_grad=True)
    hp = dict(alpha=5e-4, beta=0.75, k=2.0)
    check_against_reference(lambda t: fused(t, 5, 3, 2, 0, False, hp), lambda t: torch_pair(t, 5, 3, 2, 0, False, hp),
                            [x], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("plane", [(9, 9), (27, 27), (14, 16)])
def test_ties_pick_the_first_element(device, layout, plane):
    # A constant plane gives equal LRN outputs in every window: the first
    # element wins, as in PyTorch, and the gradient lands there.
    x = torch.ones(2, 6, *plane, dtype=torch.float64) * torch.arange(1.0, 7.0, dtype=torch.float64).view(1, 6, 1, 1)
    x[1, :, 4:, :] = -2.0  # a second tied region, of a different value
    x = x.to(device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    for window in [(5, 3, 2, 0, False), (3, 3, 2, 1, True), (5, 2, 1, 0, False)]:
        out, ours = fused_indices(x, *window)
        _, ref = F.max_pool2d(F.local_response_norm(x.cpu(), window[0], **HP), *window[1:3], padding=window[3],
                              ceil_mode=window[4], return_indices=True)
        assert torch.equal(ours.cpu(), ref)
        xg = x.clone().requires_grad_()
        check_against_reference(lambda t: fused(t, *window), lambda t: torch_pair(t, *window), [xg], torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("plane", [(9, 9), (27, 27), (14, 16)])
def test_nan_and_inf_like_the_unfused_pair(device, layout, plane):
    # A NaN input makes the LRN output NaN across its channel window; the
    # pool keeps the last NaN of a window. Values, argmax and gradients
    # (NaN included) equal PyTorch's pair.
    x = torch.randn(2, 7, *plane, dtype=torch.float64)
    x[0, 2, 3, 4] = float("nan")
    x[1, 5, 0, 0] = float("nan")
    x[1, 5, 1, 1] = float("nan")
    x[0, 6, 6, 6] = float("inf")
    x = x.to(device)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    window = (3, 3, 2, 0, False)
    out, ours = fused_indices(x, *window)
    ref_out, ref = F.max_pool2d(F.local_response_norm(x.cpu(), 3, **HP), 3, 2, return_indices=True)
    torch.testing.assert_close(out.cpu(), ref_out, equal_nan=True)
    assert torch.isnan(ref_out).any()
    assert torch.equal(ours.cpu(), ref)
    xg = x.clone().requires_grad_()
    check_against_reference(lambda t: fused(t, *window), lambda t: torch_pair(t, *window), [xg], torch.float64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("size", [1, 4, 5, 7])
def test_cpu_task_splits_equal_torch_pair(layout, threads, size):
    # The CPU backward splits one image between threads: NCHW 3x3/2 into
    # channel ranges (each recomputes the planes its LRN windows reach past
    # its ends), channels_last into bands of rows (windows cut at the
    # seams). Every LRN window shape across those seams, 1 and 3 threads.
    x = random_input((1, 13, 15, 15), torch.float64, "cpu", layout, scale=2.0, requires_grad=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_against_reference(lambda t: fused(t, size, 3, 2, 0, False),
                                lambda t: torch_pair(t, size, 3, 2, 0, False), [x], torch.float64)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("shape, size, window", [
    ((2, 64, 21, 64), 5, (3, 2, 0, False)),  # channels_last: rows split into bands that fit L2
    ((1, 70, 7, 7), 65, (3, 2, 0, False)),  # LRN window wider than the CPU's unrolled window sums
    ((1, 70, 8, 7), 65, (2, 2, 1, True)),
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_wide_windows_and_row_bands_equal_torch_pair(shape, size, window, layout):
    x = random_input(shape, torch.float64, "cpu", layout, scale=2.0, requires_grad=True)
    check_against_reference(lambda t: fused(t, size, *window), lambda t: torch_pair(t, size, *window), [x],
                            torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_negative_alpha_nan_like_the_unfused_pair(device, layout):
    # alpha < 0 drives k + alpha/size * sum x^2 below zero: NaN LRN outputs
    # and, through the backward's denominators, NaN gradients everywhere the
    # unfused pair has them (not only at the pooled elements).
    x = random_input((2, 7, 9, 9), torch.float64, device, layout, scale=2.0, requires_grad=True)
    hp = dict(alpha=-0.2, beta=0.75, k=1.5)
    out = check_against_reference(lambda t: fused(t, 5, 3, 2, 0, False, hp),
                                  lambda t: torch_pair(t, 5, 3, 2, 0, False, hp), [x], torch.float64)
    assert torch.isnan(out).any() and not torch.isnan(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_float16_large_values_do_not_overflow(device):
    x = random_input((2, 8, 9, 9), torch.float16, device, scale=2000.0, requires_grad=True)
    hp = dict(alpha=1e-2, beta=0.75, k=1.0)
    out = fused(x, 5, 3, 2, 0, False, hp)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().cpu(), torch_pair(x.detach().double().cpu(), 5, 3, 2, 0, False, hp),
                               **tolerance(torch.float16))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64, device=device, requires_grad=True)
    for size, beta, window in [(5, 0.75, (3, 2, 0, False)), (4, 1.3, (3, 2, 1, True)), (3, 0.6, (2, 1, 0, False))]:
        hp = dict(alpha=0.5, beta=beta, k=1.5)
        assert torch.autograd.gradcheck(lambda t: fused(t, size, *window, hp), (x,))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fused(t, 5, 3, 2, 0, False), (xl,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, requires_grad, layout):
    x = random_input((2, 6, 9, 8), torch.float32, device, layout, requires_grad=requires_grad)
    args = (5, 1e-3, 0.75, 2.0, [3, 3], [2, 2], [0, 0], True)
    torch.library.opcheck(_ops.lrn_max_pool2d_forward.default, (x, *args, requires_grad))
    _, argmax = _ops.lrn_max_pool2d_forward(x.detach(), *args, True)
    dy = random_input(argmax.shape, torch.float32, device, layout)
    torch.library.opcheck(_ops.lrn_max_pool2d_backward.default, (dy, argmax, x.detach(), *args))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                alexnet_ext.nn.LocalResponseNormMaxPool2d(5, 1e-3, 0.75, 2.0))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, device=device, requires_grad=True)
    check_compiled_matches_eager(model.to(device).double(), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 5, 5), (2, 0, 5, 5)])
def test_empty_tensors(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = local_response_norm_max_pool2d(x, 5)
    assert y.shape == (*shape[:2], 2, 2)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_without_grad_no_argmax_is_written(device):
    x = random_input((1, 4, 7, 7), torch.float32, device)
    with torch.no_grad():
        y = local_response_norm_max_pool2d(x, 3)
    _, argmax = _ops.lrn_max_pool2d_forward(x, 3, 1e-4, 0.75, 1.0, [3, 3], [2, 2], [0, 0], False, False)
    assert argmax.numel() == 0
    torch.testing.assert_close(y, our_pair(x, 3, 3, 2, 0, False, dict(alpha=1e-4, beta=0.75, k=1.0)))


def test_large_window_runs_as_the_two_operators():
    # 17x17 = 289 offsets do not fit the one-byte argmax.
    x = random_input((1, 4, 20, 20), torch.float64, "cpu", requires_grad=True)
    check_against_reference(lambda t: fused(t, 3, 17, 2, 8, False), lambda t: torch_pair(t, 3, 17, 2, 8, False), [x],
                            torch.float64)
    with pytest.raises(RuntimeError, match="at most 256"):
        _ops.lrn_max_pool2d_forward(x.detach(), 3, 1e-4, 0.75, 1.0, [17, 17], [2, 2], [8, 8], False, True)


def test_module_matches_torch_modules():
    m = alexnet_ext.nn.LocalResponseNormMaxPool2d(5, alpha=1e-3, beta=0.75, k=2.0, kernel_size=3, stride=2,
                                                  padding=1, ceil_mode=True)
    ref = torch.nn.Sequential(torch.nn.LocalResponseNorm(5, alpha=1e-3, beta=0.75, k=2.0),
                              torch.nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True))
    x = random_input((2, 8, 11, 11), torch.float64, "cpu")
    torch.testing.assert_close(m(x), ref(x), **tolerance(torch.float64))
    assert dict(m.state_dict()) == {} and "kernel_size=3" in repr(m)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input=[1.0]), TypeError, "input"),
    (dict(input=torch.randn(2, 4, 5)), ValueError, "4-D"),
    (dict(size=0), ValueError, "size"),
    (dict(k=-1.0), ValueError, "`k`"),
    (dict(kernel_size=0), ValueError, "kernel_size"),
    (dict(stride=(1, 2, 3)), ValueError, "stride"),
    (dict(padding=2), ValueError, "padding"),
    (dict(input=torch.randn(1, 3, 2, 2)), RuntimeError, "too small"),
    (dict(input=torch.randn(1, 3, 5, 5).int()), RuntimeError, "input"),
])
def test_bad_arguments_name_the_argument(kwargs, error, match):
    args = dict(input=torch.randn(1, 3, 5, 5), size=3, k=1.0, kernel_size=3, stride=2, padding=0)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        local_response_norm_max_pool2d(args.pop("input"), args.pop("size"), k=args.pop("k"), **args)


def test_backward_checks_its_arguments():
    x = torch.randn(1, 3, 7, 7)
    args = (3, 1e-4, 0.75, 1.0, [3, 3], [2, 2], [0, 0], False)
    _, argmax = _ops.lrn_max_pool2d_forward(x, *args, True)
    dy = torch.randn(1, 3, 3, 3)
    with pytest.raises(RuntimeError, match="uint8"):
        _ops.lrn_max_pool2d_backward(dy, argmax.int(), x, *args)
    with pytest.raises(RuntimeError, match="argmax"):
        _ops.lrn_max_pool2d_backward(dy, argmax[:, :2], x, *args)
    with pytest.raises(RuntimeError, match="grad_output"):
        _ops.lrn_max_pool2d_backward(dy.double(), argmax, x, *args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("window", [(3, 2), (2, 1)])  # NCHW: the 3x3/2 gather path and the generic one
def test_backward_rejects_offsets_outside_the_window(layout, window):
    # The CPU backward indexes x, its window sums and dx by each output's
    # argmax offset: an offset past the window (a corrupted argmax) is
    # refused by name before any kernel runs.
    kernel, stride = window
    x = random_input((2, 7, 11, 13), torch.float64, "cpu", layout, scale=2.0)
    args = (5, 0.5, 0.75, 1.5, [kernel, kernel], [stride, stride], [0, 0], False)
    _, argmax = _ops.lrn_max_pool2d_forward(x, *args, True)
    dy = random_input(argmax.shape, torch.float64, "cpu", layout)
    for bad in (kernel * kernel, 255):
        corrupted = argmax.clone()
        corrupted[1, 3, 1, 2] = bad
        with pytest.raises(RuntimeError, match="argmax"):
            _ops.lrn_max_pool2d_backward(dy, corrupted, x, *args)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("window", [(3, 2, 0, False), (3, 2, 1, True), (2, 1, 0, False)])
def test_cpu_band_seams_with_ties_and_nan(layout, window):
    # One image over 3 threads: channels_last splits it into bands of rows
    # whose seams cut pooling windows, NCHW 3x3/2 into channel ranges. Tied
    # maxima (rounded values repeat) and NaN (non-finite sums: the dense
    # formula) across those seams: values, argmax and gradients equal
    # PyTorch's pair.
    x = torch.randint(-2, 3, (1, 9, 17, 15), dtype=torch.float64)
    x[0, 4, 8, 7] = float("nan")
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    saved = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        _, ours = fused_indices(x, 5, *window)
        _, ref = F.max_pool2d(F.local_response_norm(x, 5, **HP), *window[:2], padding=window[2], ceil_mode=window[3],
                              return_indices=True)
        assert torch.equal(ours, ref)
        check_against_reference(lambda t: fused(t, 5, *window), lambda t: torch_pair(t, 5, *window),
                                [x.clone().requires_grad_()], torch.float64)
    finally:
        torch.set_num_threads(saved)
