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


class LocalResponseNormMaxPool2d(torch.nn.Module):
    """``torch.nn.LocalResponseNorm(size, alpha, beta, k)`` followed by
    ``torch.nn.MaxPool2d(kernel_size, stride, padding, ceil_mode=ceil_mode)``
    as one operator (see ``functional.local_response_norm_max_pool2d``).
    No parameters, so no ``state_dict`` entries."""

    def __init__(self, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0, kernel_size=3, stride=2,
                 padding=0, ceil_mode: bool = False):
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k
        self.kernel_size, self.stride, self.padding, self.ceil_mode = kernel_size, stride, padding, ceil_mode

    def extra_repr(self) -> str:
        return (f"{self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, ceil_mode={self.ceil_mode}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.local_response_norm_max_pool2d(input, self.size, self.alpha, self.beta, self.k, self.kernel_size,
                                                self.stride, self.padding, self.ceil_mode)


class Conv2dReLU(torch.nn.Conv2d):
    """``torch.nn.Conv2d`` followed by ReLU, computed by one fused operator.

    Same constructor, parameters, initialisation and ``state_dict`` keys as
    ``torch.nn.Conv2d`` (weights load both ways); ``dilation`` must be 1 and
    ``padding_mode`` ``'zeros'``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        if tuple(self.dilation) != (1, 1):
            raise ValueError(f"Conv2dReLU: only `dilation` = 1 is supported, got {dilation!r}")
        if padding_mode != "zeros":
            raise ValueError(f"Conv2dReLU: only `padding_mode` = 'zeros' is supported, got {padding_mode!r}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.conv2d_relu(input, self.weight, self.bias, self.stride, self.padding, self.groups)
