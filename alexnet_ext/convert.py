"""``alexnet_ext.convert(module)``: drop-in acceleration of an existing model.

Replaces, anywhere in the module tree:

- ``torch.nn.LocalResponseNorm`` by ``alexnet_ext.nn.LocalResponseNorm``;
- ``torch.nn.MaxPool2d`` by ``alexnet_ext.nn.MaxPool2d`` (dilation 1 only:
  ours has no dilation, so a dilated pool is left alone);
- a ``torch.nn.Conv2d`` immediately followed by ``torch.nn.ReLU`` in the same
  ``Sequential`` by ``alexnet_ext.nn.Conv2dReLU``, and that ReLU by
  ``Identity``, so indices and ``state_dict`` keys do not move (zero-padded,
  undilated convolutions only; others are left alone);
- a ``torch.nn.LocalResponseNorm`` immediately followed by a
  ``torch.nn.MaxPool2d`` in the same ``Sequential`` by
  ``alexnet_ext.nn.LocalResponseNormMaxPool2d``, and that pool by
  ``Identity`` (undilated pools without ``return_indices`` only).

The original parameters are reused (same Parameter objects: an optimizer
built before the conversion still updates them), the training/eval mode is
kept, and outputs are unchanged up to rounding. Subclasses of those torch
modules are left alone: they may override forward.
"""
from torch import nn

from . import nn as ann

__all__ = ["convert"]


def _fusable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and tuple(conv.dilation) == (1, 1))


def _fused(conv: nn.Conv2d) -> nn.Module:
    new = ann.Conv2dReLU(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, groups=conv.groups, bias=conv.bias is not None)
    new.weight = conv.weight
    if conv.bias is not None:
        new.bias = conv.bias
    return new


def _undilated_pool(m: nn.Module) -> bool:
    if type(m) is not nn.MaxPool2d:
        return False
    dilation = m.dilation if isinstance(m.dilation, tuple) else (m.dilation,) * 2
    return tuple(dilation) == (1, 1)


def _fused_norm_pool(norm: nn.LocalResponseNorm, pool: nn.MaxPool2d) -> nn.Module:
    return ann.LocalResponseNormMaxPool2d(norm.size, alpha=norm.alpha, beta=norm.beta, k=norm.k,
                                          kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                                          ceil_mode=pool.ceil_mode)


def _replacement(m: nn.Module):
    """Our module for a single torch module, or None to keep it."""
    if type(m) is nn.LocalResponseNorm:
        return ann.LocalResponseNorm(m.size, alpha=m.alpha, beta=m.beta, k=m.k)
    if type(m) is nn.MaxPool2d:
        if not _undilated_pool(m):
            return None
        return ann.MaxPool2d(m.kernel_size, stride=m.stride, padding=m.padding,
                             ceil_mode=m.ceil_mode, return_indices=m.return_indices)
    return None


def convert(module: nn.Module) -> nn.Module:
    """Return `module` with our operators in place of torch's (see the module
    docstring); the conversion is in place for every submodule, and the
    return value is the converted root (a new object only when the root
    itself is a replaced layer)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert: `module` must be a torch.nn.Module, got {type(module).__name__}")
    root = _replacement(module)
    if root is not None:
        return root.train(module.training)
    children = list(module.named_children())
    absorbed = None  # index of a child fused into the one before it
    for i, (name, child) in enumerate(children):
        if i == absorbed:
            continue
        new = _replacement(child)
        follower = children[i + 1][1] if isinstance(module, nn.Sequential) and i + 1 < len(children) else None
        if new is None and _fusable(child) and type(follower) is nn.ReLU:
            new = _fused(child)
        elif (type(child) is nn.LocalResponseNorm and follower is not None and _undilated_pool(follower)
              and not follower.return_indices):
            new = _fused_norm_pool(child, follower)
        else:
            follower = None
        if follower is not None:
            setattr(module, children[i + 1][0], nn.Identity())
            absorbed = i + 1
        if new is not None:
            setattr(module, name, new.train(child.training))
        else:
            convert(child)
    return module
