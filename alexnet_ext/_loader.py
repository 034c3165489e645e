"""Loads the compiled extension, or explains why it cannot be loaded."""
import importlib

import torch


def _build_description():
    try:
        from . import _build_config as cfg
    except ImportError:
        return "alexnet_ext has not been built here (no alexnet_ext/_build_config.py)"
    cuda = f"CUDA {cfg.TORCH_CUDA_VERSION}, archs {cfg.CUDA_ARCHS}" if cfg.WITH_CUDA else "CPU kernels only"
    return f"built for torch {cfg.TORCH_VERSION} ({cuda})"


def load_extension():
    try:
        return importlib.import_module("alexnet_ext._C")
    except (ImportError, OSError) as err:
        installed = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"
        raise ImportError(
            f"alexnet_ext._C failed to load: {err}\n"
            f"  the extension was {_build_description()}; installed is {installed}.\n"
            "  Rebuild it against the installed torch: pip install --no-build-isolation -e ."
        ) from err
