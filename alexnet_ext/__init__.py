"""alexnet_ext: hand-written AlexNet operators for PyTorch (CPU and CUDA).

    import alexnet_ext
    y = alexnet_ext.functional.local_response_norm(x, size=5, alpha=1e-4, beta=0.75, k=2.0)
    lrn = alexnet_ext.nn.LocalResponseNorm(5, k=2.0)   # drop-in for torch.nn.LocalResponseNorm
"""
import torch

from ._loader import load_extension

_C = load_extension()

from . import ops  # noqa: E402,F401  (registers fake kernels and autograd for the operators)
from . import functional, nn  # noqa: E402
from . import models, parallel  # noqa: E402
from .convert import convert  # noqa: E402

__version__ = "0.1.0"


def cuda_kernels_compiled() -> bool:
    """True when this build of the extension contains the CUDA kernels."""
    return bool(torch.ops.alexnet_ext._cuda_kernels_compiled())


__all__ = ["functional", "nn", "models", "parallel", "convert", "cuda_kernels_compiled", "__version__"]
