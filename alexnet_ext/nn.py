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
