"""The one test pattern every operator's tests follow.

- DEVICES / DTYPES / LAYOUTS: the parametrisation matrix.
- with_layout(): the same values in a contiguous, channels_last or
  non-contiguous (permuted storage) tensor.
- check_against_reference(): run our op and a float64 reference on the same
  fresh input, forward and backward, with tolerances that fit the dtype.
- check_compiled_matches_eager(): torch.compile(fullgraph=True) of a module
  against the module itself, output and gradients.
Outputs are poisoned with NaN before kernels write them (conftest.py).
"""
import pytest
import torch

import alexnet_ext

HAS_CUDA = torch.cuda.is_available() and alexnet_ext.cuda_kernels_compiled()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU and alexnet_ext built with CUDA kernels")

DEVICES = ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "channels_last", "permuted"]

# Tolerances for comparing an op computed in `dtype` (accumulating in float32
# for reduced precision) against a float64 reference: a few units of the
# dtype's rounding error on each input and output.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=4e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=1.5e-2),
}


def tolerance(dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    return dict(rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values as `t`, stored as `layout` says."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 5:
            return t.contiguous(memory_format=torch.channels_last_3d)
        return t.transpose(1, -1).contiguous().transpose(1, -1)  # channels innermost
    if layout == "permuted":
        # Non-contiguous and not channels_last: spatial dims swapped in storage.
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 4 else t[..., ::1].transpose(0, 1).contiguous().transpose(0, 1)
    raise ValueError(layout)


def random_input(shape, dtype, device, layout="contiguous", scale=1.0, requires_grad=False):
    """Fresh random values (never zeros), stored as `layout` says."""
    t = (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)
    t = with_layout(t.to(device), layout)
    return t.requires_grad_(requires_grad)


def check_against_reference(op, reference, inputs, dtype, grad=True, tol_scale=1.0):
    """op(*inputs) vs reference(*inputs in float64 on the CPU): outputs and,
    when `grad`, the gradients of every input that requires grad, for a
    fresh random upstream gradient."""
    out = op(*inputs)
    ref_inputs = [x.detach().double().cpu().contiguous().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                  for x in inputs]
    ref = reference(*ref_inputs)
    assert out.shape == ref.shape
    assert out.dtype == dtype
    torch.testing.assert_close(out.double().cpu(), ref, equal_nan=True, **tolerance(dtype, tol_scale))
    if not grad:
        return out
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    tensors = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    ref_tensors = [x for x in ref_inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    got = torch.autograd.grad(out, tensors, upstream.to(dtype).to(out.device))
    want = torch.autograd.grad(ref, ref_tensors, upstream.to(dtype).double())
    for g, w, x in zip(got, want, tensors):
        assert g.shape == x.shape and g.dtype == x.dtype
        torch.testing.assert_close(g.double().cpu(), w, equal_nan=True, **tolerance(dtype, tol_scale * 4))
    return out


def check_compiled_matches_eager(model, x, wrt=()):
    """torch.compile(model, fullgraph=True) gives model's output and the same
    gradients of a random upstream gradient with respect to x and each tensor
    in `wrt`. Returns (compiled module, eager output)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    eager_out, compiled_out = model(x), compiled(x)
    torch.testing.assert_close(compiled_out, eager_out)
    g = torch.randn_like(eager_out)
    inputs = [x, *wrt]
    for got, want in zip(torch.autograd.grad(compiled_out, inputs, g), torch.autograd.grad(eager_out, inputs, g)):
        torch.testing.assert_close(got, want)
    return compiled, eager_out
