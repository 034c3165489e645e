"""Library baselines for the benchmarks, built on demand where available."""
import glob
import os
import sys


def cudnn_paths():
    """(include dir, library file) of cuDNN, from the nvidia-cudnn wheel that
    CUDA builds of PyTorch install, or from CUDA_HOME / CUDNN_HOME."""
    roots = []
    try:
        import nvidia.cudnn as pkg  # the wheel PyTorch's CUDA builds depend on
        roots += list(pkg.__path__)
    except ImportError:
        pass
    roots += [os.environ.get("CUDNN_HOME", ""), os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", "/usr"]
    for root in filter(None, roots):
        header = glob.glob(os.path.join(root, "include", "cudnn.h"))
        libs = sorted(glob.glob(os.path.join(root, "lib*", "libcudnn.so*")) +
                      glob.glob(os.path.join(root, "lib", "x86_64-linux-gnu", "libcudnn.so*")))
        if header and libs:
            return os.path.dirname(header[0]), libs[0]
    return None


def _load_cudnn_binding(what, source):
    """Builds one of the cuDNN bindings here, or (None, reason)."""
    paths = cudnn_paths()
    if paths is None:
        return None, "cuDNN headers not found (pip's nvidia-cudnn wheel, CUDNN_HOME or CUDA_HOME)"
    include, lib = paths
    from torch.utils.cpp_extension import load
    try:
        mod = load(name=f"alexnet_ext_bench_cudnn_{what}",
                   sources=[os.path.join(os.path.dirname(__file__), source)],
                   extra_include_paths=[include], extra_ldflags=[lib], with_cuda=True, verbose=False)
    except Exception as err:  # a baseline that does not build is reported, not fatal
        print(f"cuDNN {what} baseline failed to build: {err}", file=sys.stderr)
        return None, f"cuDNN {what} baseline failed to build ({type(err).__name__})"
    return mod, ""


def load_cudnn_lrn():
    """The cuDNN LRN binding, or (None, reason) when it cannot be built."""
    return _load_cudnn_binding("lrn", "cudnn_lrn.cpp")


def load_cudnn_pool():
    """The cuDNN max-pooling binding, or (None, reason) when it cannot be built."""
    return _load_cudnn_binding("pool", "cudnn_pool.cpp")
