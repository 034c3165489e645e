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
    if not isinstance(input, Tensor):
        raise TypeError(f"local_response_norm: `input` must be a Tensor, got {type(input).__name__}")
    if input.dim() < 3:
        raise ValueError(f"local_response_norm: `input` must have 3 or more dimensions (N, C, *), "
                         f"got {input.dim()} ({tuple(input.shape)})")
    if int(size) != size or size < 1:
        raise ValueError(f"local_response_norm: `size` must be an integer >= 1, got {size}")
    if not math.isfinite(k) or k < 0:
        raise ValueError(f"local_response_norm: `k` must be finite and >= 0, got {k}")
    return _ops.lrn_forward(input, int(size), float(alpha), float(beta), float(k))
