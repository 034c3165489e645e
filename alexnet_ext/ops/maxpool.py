"""Overlapping max-pool: fake kernels and autograd for
alexnet_ext::max_pool2d_forward.

Saved for backward: only the argmax tensor, the offset of each maximum
inside its window as one byte per output element (int32 for windows over
256 elements), instead of PyTorch's int64 flat indices: 8x less memory for
the same information. Neither the input nor the output is kept alive.
"""
import torch

from ._common import empty_output_like

_ops = torch.ops.alexnet_ext

# Mirrors kMaxUint8Window in csrc/maxpool/pool_math.h.
MAX_UINT8_WINDOW = 256


def offset_dtype(kernel_size):
    return torch.uint8 if kernel_size[0] * kernel_size[1] <= MAX_UINT8_WINDOW else torch.int32


def pooled_size(size, k, s, p, ceil_mode):
    """PyTorch's pooling output size (dilation 1), like pooled_size() in pool_math.h."""
    out = (size + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def output_shape(input_shape, kernel_size, stride, padding, ceil_mode):
    n, c, h, w = input_shape
    return (n, c, pooled_size(h, kernel_size[0], stride[0], padding[0], ceil_mode),
            pooled_size(w, kernel_size[1], stride[1], padding[1], ceil_mode))


@torch.library.register_fake("alexnet_ext::max_pool2d_forward")
def _forward_fake(input, kernel_size, stride, padding, ceil_mode, save_argmax):
    torch._check(input.dim() == 4, lambda: "`input` must be 4-dimensional (N, C, H, W)")
    shape = output_shape(input.shape, kernel_size, stride, padding, ceil_mode)
    out = empty_output_like(input, shape)
    if save_argmax:
        argmax = empty_output_like(input, shape, dtype=offset_dtype(kernel_size))
    else:
        argmax = input.new_empty((0,), dtype=offset_dtype(kernel_size))
    return out, argmax


@torch.library.register_fake("alexnet_ext::max_pool2d_backward")
def _backward_fake(grad_output, argmax, input_size, kernel_size, stride, padding, ceil_mode):
    torch._check(grad_output.shape == argmax.shape, lambda: "`grad_output` and `argmax` shapes differ")
    return empty_output_like(argmax, tuple(input_size), dtype=grad_output.dtype)


def _setup_context(ctx, inputs, output):
    input, kernel_size, stride, padding, ceil_mode, save_argmax = inputs
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(argmax)
    ctx.input_size = input.shape
    ctx.window = (kernel_size, stride, padding, ceil_mode)
    ctx.saved_argmax = save_argmax


def _backward(ctx, grad_output, _grad_argmax):
    if not ctx.saved_argmax:
        raise RuntimeError("alexnet_ext.max_pool2d: backward through a forward that ran with save_argmax=False; "
                           "call alexnet_ext.functional.max_pool2d (it decides save_argmax from requires_grad)")
    (argmax,) = ctx.saved_tensors
    grad_input = _ops.max_pool2d_backward(grad_output, argmax, list(ctx.input_size), *ctx.window)
    return grad_input, None, None, None, None, None


torch.library.register_autograd("alexnet_ext::max_pool2d_forward", _backward, setup_context=_setup_context)


def flat_indices(argmax, input_width, kernel_size, stride, padding):
    """PyTorch's return_indices from our window offsets: the flat index
    h * W + w of each maximum inside its (H, W) plane, as int64."""
    oh = torch.arange(argmax.shape[-2], device=argmax.device).view(-1, 1)
    ow = torch.arange(argmax.shape[-1], device=argmax.device)
    off = argmax.long()
    h = oh * stride[0] - padding[0] + torch.div(off, kernel_size[1], rounding_mode="floor")
    w = ow * stride[1] - padding[1] + off % kernel_size[1]
    return h * input_width + w
