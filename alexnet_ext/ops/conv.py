"""conv2d + bias + ReLU: fake kernels and autograd for
alexnet_ext::conv2d_relu_forward.

Saved for backward: input, weight and the output y only. The backward
kernel recomputes ReLU's gradient mask from y (y > 0; NaN passes, as
threshold_backward), so no pre-activation tensor or mask is kept.
"""
import torch

from ._common import empty_output_like

_ops = torch.ops.alexnet_ext


def _out_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


@torch.library.register_fake("alexnet_ext::conv2d_relu_forward")
def _forward_fake(input, weight, bias, stride, padding, groups):
    torch._check(input.dim() == 4 and weight.dim() == 4, lambda: "`input` and `weight` must be 4-D")
    torch._check(weight.shape[1] * groups == input.shape[1], lambda: "`weight` and `input` channels differ")
    n, _, h, w = input.shape
    k, _, r, s = weight.shape
    shape = (n, k, _out_size(h, r, stride[0], padding[0]), _out_size(w, s, stride[1], padding[1]))
    return empty_output_like(input, shape)


@torch.library.register_fake("alexnet_ext::conv2d_relu_backward")
def _backward_fake(grad_output, input, weight, output, stride, padding, groups, output_mask):
    torch._check(grad_output.shape == output.shape, lambda: "`grad_output` and `output` shapes differ")
    # Gradients not asked for are empty tensors (never one shared tensor: outputs must not alias).
    dx = empty_output_like(input) if output_mask[0] else input.new_empty((0,))
    dw = empty_output_like(weight) if output_mask[1] else input.new_empty((0,))
    db = input.new_empty((weight.shape[0],)) if output_mask[2] else input.new_empty((0,))
    return dx, dw, db


def _setup_context(ctx, inputs, output):
    input, weight, bias, stride, padding, groups = inputs
    ctx.save_for_backward(input, weight, output)
    ctx.conv = (stride, padding, groups)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_output):
    input, weight, output = ctx.saved_tensors
    mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
    if not any(mask):
        return None, None, None, None, None, None
    dx, dw, db = _ops.conv2d_relu_backward(grad_output, input, weight, output, *ctx.conv, mask)
    return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None, None, None, None)


torch.library.register_autograd("alexnet_ext::conv2d_relu_forward", _backward, setup_context=_setup_context)
