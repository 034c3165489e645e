"""Drop-in replacements for torch.nn.functional, computed by our kernels."""
import math

import torch
from torch import Tensor

_ops = torch.ops.alexnet_ext


def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> Tensor:
    """Cross-channel LRN with exactly the semantics of
    ``torch.nn.functional.local_response_norm``: ``alpha`` is divided by
    ``size``, channels beyond the edges count as zeros, and an even window
    spans ``size // 2`` channels before and ``(size - 1) // 2`` after.

    ``input`` is ``(N, C, *)``, float64/32/16 or bfloat16; reduced precision
    accumulates in float32 (so float16 inputs above 256 do not overflow).
    The output keeps the input's memory format (channels_last stays so).
    """
    _check_lrn_args(input, size, k, "local_response_norm")
    return _ops.lrn_forward(input, int(size), float(alpha), float(beta), float(k))


def _check_lrn_args(input, size, k, op):
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: `input` must be a Tensor, got {type(input).__name__}")
    if input.dim() < 3:
        raise ValueError(f"{op}: `input` must have 3 or more dimensions (N, C, *), "
                         f"got {input.dim()} ({tuple(input.shape)})")
    if int(size) != size or size < 1:
        raise ValueError(f"{op}: `size` must be an integer >= 1, got {size}")
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"{op}: `k` must be finite and >= 0, got {k}")


def _pair(value, name, op):
    """(a, b) from an int or a pair (a 1-element sequence repeats), with an
    error naming the op and the argument otherwise."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2:
            raise ValueError(f"{op}: `{name}` must be an int or a pair of ints, got {value}")
        pair = tuple(value)
    else:
        pair = (value, value)
    for v in pair:
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{op}: `{name}` must be an int or a pair of ints, got {value!r}")
        if not -2**63 <= v < 2**63:  # the operators take int64
            raise ValueError(f"{op}: `{name}` is out of range, got {value!r}")
    return pair


def max_pool2d(input: Tensor, kernel_size=3, stride=2, padding=0, ceil_mode: bool = False,
               return_indices: bool = False, dilation=1):
    """2D max pooling with the results of ``torch.nn.functional.max_pool2d``
    (dilation 1): any kernel size, stride and padding, ``ceil_mode``,
    ``(C, H, W)`` or ``(N, C, H, W)`` inputs; NaN propagates and among equal
    maxima the first in the window wins, so gradients land where PyTorch's
    do. ``stride=None`` means ``kernel_size``, like PyTorch.

    Backward keeps only a one-byte offset of each maximum inside its window
    (uint8; int32 for windows over 256 elements) instead of int64 indices,
    and nothing at all when no gradient is needed. With
    ``return_indices=True`` it also returns PyTorch's int64 flat indices
    (``h * W + w`` per plane), so ``max_unpool2d`` keeps working.
    The output keeps the input's memory format.
    """
    from .ops.maxpool import flat_indices

    if not isinstance(input, Tensor):
        raise TypeError(f"max_pool2d: `input` must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (3, 4):
        raise ValueError(f"max_pool2d: `input` must be 3D (C, H, W) or 4D (N, C, H, W), "
                         f"got {input.dim()}D ({tuple(input.shape)})")
    if _pair(dilation, "dilation", "max_pool2d") != (1, 1):
        raise ValueError(f"max_pool2d: `dilation` other than 1 is not supported by alexnet_ext, got {dilation}; "
                         "use torch.nn.functional.max_pool2d for dilated pooling")
    kernel_size, stride, padding = _pool_window(kernel_size, stride, padding, "max_pool2d")
    batched = input.dim() == 4
    x = input if batched else input.unsqueeze(0)
    save_argmax = bool(return_indices) or (x.requires_grad and torch.is_grad_enabled())
    out, argmax = _ops.max_pool2d_forward(x, list(kernel_size), list(stride), list(padding), bool(ceil_mode),
                                          save_argmax)
    if not batched:
        out = out.squeeze(0)
    if not return_indices:
        return out
    indices = flat_indices(argmax, x.shape[-1], kernel_size, stride, padding)
    return out, indices if batched else indices.squeeze(0)


def _pool_window(kernel_size, stride, padding, op):
    """Checked (kernel_size, stride, padding) pairs; ``stride=None`` (or
    an empty sequence) means ``kernel_size``, like PyTorch."""
    kernel_size = _pair(kernel_size, "kernel_size", op)
    stride = kernel_size if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) \
        else _pair(stride, "stride", op)
    padding = _pair(padding, "padding", op)
    if min(kernel_size) < 1:
        raise ValueError(f"{op}: `kernel_size` must be positive, got {kernel_size}")
    if min(stride) < 1:
        raise ValueError(f"{op}: `stride` must be positive, got {stride}")
    if min(padding) < 0 or padding[0] > kernel_size[0] // 2 or padding[1] > kernel_size[1] // 2:
        raise ValueError(f"{op}: `padding` must be between 0 and half the kernel size, "
                         f"got padding={padding} for kernel_size={kernel_size}")
    return kernel_size, stride, padding


def local_response_norm_max_pool2d(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                                   k: float = 1.0, kernel_size=3, stride=2, padding=0,
                                   ceil_mode: bool = False) -> Tensor:
    """``max_pool2d(local_response_norm(input, size, alpha, beta, k),
    kernel_size, stride, padding, ceil_mode)`` in one operator, with the
    same values and gradients (the maximum is taken over the LRN output
    rounded to the input's dtype, with PyTorch's NaN and tie rules, so the
    gradient lands where the unfused pair puts it).

    The LRN output is never written: forward reads the input once and
    writes the pooled output (and, when a gradient is needed, a one-byte
    argmax); backward recomputes the LRN denominators from the input.
    ``input`` is ``(N, C, H, W)``, float64/32/16 or bfloat16 (reduced
    precision accumulates in float32); the output keeps its memory format.
    Windows of more than 256 elements run as the two operators.
    """
    op = "local_response_norm_max_pool2d"
    _check_lrn_args(input, size, k, op)
    if input.dim() != 4:
        raise ValueError(f"{op}: `input` must be 4-D (N, C, H, W), got {input.dim()}D ({tuple(input.shape)})")
    kernel_size, stride, padding = _pool_window(kernel_size, stride, padding, op)
    if kernel_size[0] * kernel_size[1] > 256:  # argmax offsets no longer fit a byte: the unfused pair
        return max_pool2d(local_response_norm(input, size, alpha, beta, k), kernel_size, stride, padding,
                          ceil_mode)
    save_argmax = input.requires_grad and torch.is_grad_enabled()
    out, _ = _ops.lrn_max_pool2d_forward(input, int(size), float(alpha), float(beta), float(k), list(kernel_size),
                                         list(stride), list(padding), bool(ceil_mode), save_argmax)
    return out


def _autocast_dtype(device_type):
    """The dtype autocast runs convolutions in on `device_type`, or None."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def conv2d_relu(input: Tensor, weight: Tensor, bias=None, stride=1, padding=0, groups: int = 1, *,
                dilation=1) -> Tensor:
    """``F.relu(F.conv2d(input, weight, bias, stride, padding, groups=groups))``
    in one operator: bias and ReLU are applied to the accumulator before the
    single store, and backward keeps only input, weight and the output.

    ``input`` is ``(N, C, H, W)`` (channels_last is the CUDA kernels' native
    layout; NCHW is converted), ``weight`` ``(K, C/groups, R, S)``, ``bias``
    ``(K,)`` or None. ``padding`` may also be ``'valid'`` or ``'same'`` (odd
    kernels, stride 1). Only ``dilation=1`` is supported. Under autocast the
    operands are cast to the autocast dtype, as ``F.conv2d`` does. On CUDA,
    float32 runs on TF32 tensor cores when PyTorch's convolution setting
    allows it, as cuDNN convolutions do: ``torch.backends.cudnn.conv.fp32_precision``
    (``"tf32"``, the default, or ``"ieee"``), which the legacy
    ``torch.backends.cudnn.allow_tf32`` also sets; exactly (FFMA) otherwise.
    """
    for name, t in (("input", input), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"conv2d_relu: `{name}` must be a Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(f"conv2d_relu: `bias` must be a Tensor or None, got {type(bias).__name__}")
    if input.dim() != 4:
        raise ValueError(f"conv2d_relu: `input` must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"conv2d_relu: `weight` must be 4-D (K, C/groups, R, S), got shape {tuple(weight.shape)}")
    if _pair(dilation, "dilation", "conv2d_relu") != (1, 1):
        raise ValueError(f"conv2d_relu: only `dilation` = 1 is supported, got {dilation!r}")
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"conv2d_relu: `groups` must be an int >= 1, got {groups!r}")
    stride = _pair(stride, "stride", "conv2d_relu")
    if isinstance(padding, str):
        kernel = weight.shape[2:]
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same" and stride == (1, 1) and all(k % 2 == 1 for k in kernel):
            padding = [kernel[0] // 2, kernel[1] // 2]
        else:
            raise ValueError(f"conv2d_relu: `padding` = {padding!r} is supported as 'valid', or 'same' with "
                             f"stride 1 and odd kernel sizes (got stride {stride}, kernel {tuple(kernel)})")
    padding = _pair(padding, "padding", "conv2d_relu")
    cast = _autocast_dtype(input.device.type)
    if cast is not None:
        # As autocast's own casts: floating tensors other than float64 only.
        to = lambda t: t.to(cast) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        input, weight, bias = to(input), to(weight), to(bias)
    return _ops.conv2d_relu_forward(input, weight, bias, stride, padding, groups)
