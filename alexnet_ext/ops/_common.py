"""Shared by the per-operator registration modules."""
import torch


def suggested_memory_format(t: torch.Tensor) -> torch.memory_format:
    """The memory format our kernels give their outputs: mirrors
    suggested_format() in csrc/common/op_utils.cpp, so fake tensors get the
    same strides as real ones."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if t.dim() == 5 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def empty_output_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    shape = t.shape if shape is None else shape
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device,
                       memory_format=suggested_memory_format(t))
