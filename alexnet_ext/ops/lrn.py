"""Cross-channel LRN: fake kernels and autograd for alexnet_ext::lrn_forward.

Only the input is saved for backward: the backward kernel recomputes the
denominators (and so the output) in registers, which costs less memory
traffic than reading a saved output back.
"""
import torch

from ._common import empty_output_like

_ops = torch.ops.alexnet_ext


@torch.library.register_fake("alexnet_ext::lrn_forward")
def _lrn_forward_fake(input, size, alpha, beta, k):
    torch._check(input.dim() >= 3, lambda: "`input` must have 3 or more dimensions (N, C, *)")
    return empty_output_like(input)


@torch.library.register_fake("alexnet_ext::lrn_backward")
def _lrn_backward_fake(grad_output, input, size, alpha, beta, k):
    torch._check(grad_output.shape == input.shape, lambda: "`grad_output` and `input` shapes differ")
    return empty_output_like(input)


def _setup_context(ctx, inputs, output):
    input, size, alpha, beta, k = inputs
    ctx.save_for_backward(input)
    ctx.hyper = (size, alpha, beta, k)


def _backward(ctx, grad_output):
    (input,) = ctx.saved_tensors
    return _ops.lrn_backward(grad_output, input, *ctx.hyper), None, None, None, None


torch.library.register_autograd("alexnet_ext::lrn_forward", _backward, setup_context=_setup_context)
