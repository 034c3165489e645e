"""`python -m alexnet_ext.info`: what was built and what this machine has."""
import platform

import torch


def _gpu_lines():
    if not torch.cuda.is_available():
        return ["  (no CUDA device visible)"]
    lines = []
    for i in range(torch.cuda.device_count()):
        prop = torch.cuda.get_device_properties(i)
        lines.append(f"  cuda:{i}  {prop.name}  sm_{prop.major}{prop.minor}  "
                     f"{prop.total_memory / 2**30:.1f} GiB  {prop.multi_processor_count} SMs")
    return lines


def peer_access_matrix():
    """can_device_access_peer for every ordered pair of visible GPUs."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(n)] for i in range(n)]


def _peer_lines():
    matrix = peer_access_matrix()
    if len(matrix) < 2:
        return ["  (fewer than two GPUs: no peer-to-peer pairs)"]
    n = len(matrix)
    lines = ["  src\\dst " + " ".join(f"{j:>4d}" for j in range(n))]
    for i in range(n):
        lines.append(f"  {i:>7d} " + " ".join(f"{'yes' if matrix[i][j] else 'no':>4s}" for j in range(n)))
    return lines


def report() -> str:
    import alexnet_ext
    try:
        from alexnet_ext import _build_config as cfg
        built_archs = cfg.CUDA_ARCHS if cfg.WITH_CUDA else "-"
        built_for = f"torch {cfg.TORCH_VERSION}"
    except ImportError:
        built_archs, built_for = "?", "?"
    lines = [
        f"alexnet_ext     {alexnet_ext.__version__}",
        f"python          {platform.python_version()}",
        f"torch           {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'})",
        f"built for       {built_for}",
        f"CUDA kernels    {'compiled' if alexnet_ext.cuda_kernels_compiled() else 'not compiled'}"
        f" (archs: {built_archs})",
        "GPUs:",
        *_gpu_lines(),
        "peer-to-peer access:",
        *_peer_lines(),
    ]
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
