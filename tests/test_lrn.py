"""Cross-channel LRN against torch.nn.functional.local_response_norm."""
import random

import pytest
import torch
import torch.nn.functional as F

import alexnet_ext
from alexnet_ext.functional import local_response_norm
from op_testing import (DEVICES, DTYPES, LAYOUTS, check_against_reference, check_compiled_matches_eager, random_input,
                        requires_cuda)

# (shape, size): 3D/4D/5D inputs, every window 1..9 odd and even, C smaller
# than the window, odd spatial sizes.
CASES = [
    ((2, 6, 7), 1),
    ((2, 5, 4, 3), 2),
    ((1, 16, 5, 7), 3),
    ((2, 7, 3, 5), 4),
    ((3, 12, 6, 5), 5),
    ((1, 3, 4, 4), 5),  # C < size
    ((2, 9, 2, 3, 4), 6),
    ((1, 11, 5, 3), 7),
    ((2, 2, 3, 3), 8),  # C much smaller than the window
    ((1, 20, 3, 4), 9),
]


def random_hyper():
    return dict(alpha=random.uniform(1e-4, 2.0), beta=random.uniform(0.1, 1.5), k=random.uniform(0.5, 3.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,size", CASES)
def test_matches_torch_forward_and_backward(device, dtype, layout, shape, size):
    hp = random_hyper()
    x = random_input(shape, dtype, device, layout, requires_grad=True)
    check_against_reference(
        lambda t: local_response_norm(t, size, **hp),
        lambda t: F.local_response_norm(t, size, **hp),
        [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("beta", [0.75, 0.5])
def test_alexnet_hyper_parameters(device, beta):
    # AlexNet's own setting, including the beta == 0.75 rsqrt fast path.
    x = random_input((2, 96, 9, 9), torch.float32, device, "channels_last", scale=3.0, requires_grad=True)
    check_against_reference(lambda t: local_response_norm(t, 5, 1e-4, beta, 2.0),
                            lambda t: F.local_response_norm(t, 5, 1e-4, beta, 2.0), [x], torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", [3, 5, 7, 9])
def test_alexnet_channels_every_window_path(device, dtype, layout, size):
    # 96 channels: the CUDA kernels' compile-time windows (3/5/7/9) with
    # beta = 0.75, 16-byte vector rows in channels_last (96 % 16 == 0), and an
    # odd pixel count (35) for the NCHW tiles' edge.
    x = random_input((2, 96, 5, 7), dtype, device, layout, scale=3.0, requires_grad=True)
    check_against_reference(lambda t: local_response_norm(t, size, 1e-3, 0.75, 2.0),
                            lambda t: F.local_response_norm(t, size, 1e-3, 0.75, 2.0), [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [3, 5, 9])
@pytest.mark.parametrize("hw", [(16, 16), (17, 19), (25, 24)], ids=["P256", "P323", "P600"])
def test_nchw_planes_of_whole_tiles(device, dtype, size, hw):
    # NCHW planes of at least 256 pixels: the CUDA channel walk loads whole
    # tiles of 256 pixels without checks, moving an image's last tile back to
    # end at the plane's end (P = 323 and 600: it overlaps the tile before,
    # whose pixels it must not store again; P = 256: no overlap). 40
    # channels are cut into segments with halos when the tensor is small.
    x = random_input((2, 40) + hw, dtype, device, scale=3.0, requires_grad=True)
    check_against_reference(lambda t: local_response_norm(t, size, 1e-3, 0.75, 2.0),
                            lambda t: F.local_response_norm(t, size, 1e-3, 0.75, 2.0), [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels", [16, 24, 40])
def test_channels_last_chunks_of_two_vectors(device, dtype, channels):
    # channels_last: a CUDA thread owns 32 bytes of channels (16 half/bfloat16,
    # 8 float); 24 and 40 half channels are not a multiple of 16 and take the
    # scalar path, 16 is one thread per pixel (no neighbours).
    x = random_input((2, channels, 5, 6), dtype, device, "channels_last", scale=3.0, requires_grad=True)
    check_against_reference(lambda t: local_response_norm(t, 5, 1e-3, 0.75, 2.0),
                            lambda t: F.local_response_norm(t, 5, 1e-3, 0.75, 2.0), [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_float16_large_values_do_not_overflow(device):
    # x*x overflows float16 above ~256; we accumulate in float32.
    x = random_input((2, 8, 4, 4), torch.float16, device, scale=2000.0, requires_grad=True)
    out = check_against_reference(lambda t: local_response_norm(t, 5, 1e-2, 0.75, 1.0),
                                  lambda t: F.local_response_norm(t, 5, 1e-2, 0.75, 1.0), [x], torch.float16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", DEVICES)
def test_nan_and_inf_propagate_like_torch(device):
    x = torch.randn(2, 7, 3, 3, dtype=torch.float64)
    x[0, 2, 1, 1] = float("nan")
    x[1, 4, 0, 2] = float("inf")
    x[1, 0, 2, 2] = float("-inf")
    ours = local_response_norm(x.to(device), 3, 0.1, 0.75, 1.0).cpu()
    ref = F.local_response_norm(x, 3, 0.1, 0.75, 1.0)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert torch.isnan(ours).sum() == torch.isnan(ref).sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    for size, beta in [(3, 0.75), (4, 0.6), (5, 1.3)]:
        assert torch.autograd.gradcheck(lambda t: local_response_norm(t, size, 0.5, beta, 1.5), (x,))
    xl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: local_response_norm(t, 5, 0.5, 0.75, 2.0), (xl,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(device, requires_grad, layout):
    x = random_input((2, 6, 4, 5), torch.float32, device, layout, requires_grad=requires_grad)
    torch.library.opcheck(torch.ops.alexnet_ext.lrn_forward.default, (x, 5, 1e-3, 0.75, 2.0))
    dy = random_input((2, 6, 4, 5), torch.float32, device, layout)
    torch.library.opcheck(torch.ops.alexnet_ext.lrn_backward.default, (dy, x.detach(), 5, 1e-3, 0.75, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_matches_eager(device):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), alexnet_ext.nn.LocalResponseNorm(5, k=2.0))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, device=device, requires_grad=True)
    check_compiled_matches_eager(model.to(device).double(), x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dim", [3, 4, 5])
def test_output_keeps_memory_format(device, dim):
    shape = (2, 6, 5, 4, 3)[:dim]
    for layout in ["contiguous", "channels_last"]:
        x = random_input(shape, torch.float32, device, layout, requires_grad=True)
        y = local_response_norm(x, 3)
        assert y.stride() == x.stride() or dim == 3
        (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
        assert gx.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 0, 3, 3), (2, 3, 0, 4), (0, 3, 5)])
def test_empty_tensors(device, shape):
    x = torch.randn(shape, device=device, requires_grad=True)
    y = local_response_norm(x, 5)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="`input`"):
        local_response_norm(torch.randn(4, 3), 3)
    with pytest.raises(ValueError, match="`size`"):
        local_response_norm(x, 0)
    for k in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="`k`"):
            local_response_norm(x, 3, k=k)
    with pytest.raises(RuntimeError, match="`input`"):
        local_response_norm(torch.ones(2, 4, 3, 3, dtype=torch.int32), 3)
    # The operator itself checks too, for callers that bypass the Python API.
    with pytest.raises(RuntimeError, match="`size`"):
        torch.ops.alexnet_ext.lrn_forward(x, 0, 1e-4, 0.75, 1.0)
    with pytest.raises(RuntimeError, match="`k`"):
        torch.ops.alexnet_ext.lrn_forward(x, 3, 1e-4, 0.75, -2.0)
    with pytest.raises(RuntimeError, match="`grad_output`"):
        torch.ops.alexnet_ext.lrn_backward(torch.randn(2, 4, 3), x, 3, 1e-4, 0.75, 1.0)


def test_module_is_a_drop_in_for_torch():
    ours = alexnet_ext.nn.LocalResponseNorm(5, alpha=2e-4, beta=0.7, k=2.0)
    theirs = torch.nn.LocalResponseNorm(5, alpha=2e-4, beta=0.7, k=2.0)
    assert repr(ours) == repr(theirs)
    assert isinstance(ours, torch.nn.LocalResponseNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 10, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("size", [5, 40])  # 40 takes the wide-window path
def test_cuda_matches_cpu(dtype, layout, size):
    x = random_input((3, 70, 9, 11), dtype, "cpu", layout, requires_grad=True)
    xc = x.detach().cuda().requires_grad_()
    yc, y = local_response_norm(xc, size, 1e-3, 0.75, 2.0), local_response_norm(x, size, 1e-3, 0.75, 2.0)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    if dtype in (torch.float16, torch.bfloat16):
        tol = dict(rtol=1e-2, atol=1e-2)  # one rounding step of the output dtype
    torch.testing.assert_close(yc.cpu().double(), y.double(), **tol)
    g = torch.randn(y.shape, dtype=dtype)
    (gc,) = torch.autograd.grad(yc, xc, g.cuda())
    (gh,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gc.cpu().double(), gh.double(), **tol)


@pytest.mark.cuda
@pytest.mark.slow
@requires_cuda
def test_cuda_more_than_2_pow_31_elements():
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    n_pix = 2**31 // 4 + 4099
    x = torch.randn(1, 4, n_pix, dtype=torch.float16, device="cuda")
    assert x.numel() > 2**31
    y = local_response_norm(x, 3, 0.5, 0.75, 1.0)
    tail = x[..., -4096:].double().cpu()
    torch.testing.assert_close(y[..., -4096:].double().cpu(), F.local_response_norm(tail, 3, 0.5, 0.75, 1.0),
                               rtol=2e-3, atol=2e-3)
    dx = torch.ops.alexnet_ext.lrn_backward(torch.ones_like(x), x, 3, 0.5, 0.75, 1.0)
    assert torch.isfinite(dx[..., -4096:]).all()
