"""Fused LRN + max-pool: fake kernels and autograd for
alexnet_ext::lrn_max_pool2d_forward.

Saved for backward: the input and the one-byte argmax. The LRN output is
never stored: backward recomputes the denominators from the input, and
the gradient of the LRN output is the pool's scatter of the pooled
gradient, formed inside the kernel. Compared with the two operators in
sequence (LRN saves its input, the pool its argmax) nothing more is kept.
"""
import torch

from ._common import empty_output_like
from .maxpool import output_shape

_ops = torch.ops.alexnet_ext


@torch.library.register_fake("alexnet_ext::lrn_max_pool2d_forward")
def _forward_fake(input, size, alpha, beta, k, kernel_size, stride, padding, ceil_mode, save_argmax):
    torch._check(input.dim() == 4, lambda: "`input` must be 4-dimensional (N, C, H, W)")
    shape = output_shape(input.shape, kernel_size, stride, padding, ceil_mode)
    out = empty_output_like(input, shape)
    argmax = empty_output_like(input, shape, dtype=torch.uint8) if save_argmax \
        else input.new_empty((0,), dtype=torch.uint8)
    return out, argmax


@torch.library.register_fake("alexnet_ext::lrn_max_pool2d_backward")
def _backward_fake(grad_output, argmax, input, size, alpha, beta, k, kernel_size, stride, padding, ceil_mode):
    torch._check(grad_output.shape == argmax.shape, lambda: "`grad_output` and `argmax` shapes differ")
    return empty_output_like(input)


def _setup_context(ctx, inputs, output):
    input, size, alpha, beta, k, kernel_size, stride, padding, ceil_mode, save_argmax = inputs
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(input, argmax)
    ctx.hyper = (size, alpha, beta, k, kernel_size, stride, padding, ceil_mode)
    ctx.saved_argmax = save_argmax


def _backward(ctx, grad_output, _grad_argmax):
    if not ctx.saved_argmax:
        raise RuntimeError("alexnet_ext.local_response_norm_max_pool2d: backward through a forward that ran with "
                           "save_argmax=False; call alexnet_ext.functional.local_response_norm_max_pool2d (it "
                           "decides save_argmax from requires_grad)")
    input, argmax = ctx.saved_tensors
    grad_input = _ops.lrn_max_pool2d_backward(grad_output, argmax, input, *ctx.hyper)
    return (grad_input,) + (None,) * 9


torch.library.register_autograd("alexnet_ext::lrn_max_pool2d_forward", _backward, setup_context=_setup_context)
