"""Drop-in replacements for torch.nn modules, computed by our kernels.

Each subclasses the torch.nn module it replaces, so constructors, repr,
state_dict keys and isinstance checks stay exactly as users know them.
"""
import torch

from . import functional as F


class LocalResponseNorm(torch.nn.LocalResponseNorm):
    """``torch.nn.LocalResponseNorm(size, alpha=1e-4, beta=0.75, k=1.0)``,
    computed by alexnet_ext's one-pass kernels."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm(input, self.size, self.alpha, self.beta, self.k)


class MaxPool2d(torch.nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` computed by alexnet_ext's kernels, with AlexNet's
    overlapping window as the default (``kernel_size=3, stride=2``).
    ``dilation`` other than 1 raises a ValueError when the module runs."""

    def __init__(self, kernel_size=3, stride=2, padding=0, dilation=1, return_indices=False, ceil_mode=False):
        super().__init__(kernel_size, stride=stride, padding=padding, dilation=dilation,
                         return_indices=return_indices, ceil_mode=ceil_mode)

    def forward(self, input: torch.Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.return_indices, self.dilation)
