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


def _matrix_lines(matrix, cell, width):
    n = len(matrix)
    lines = ["  src\\dst " + " ".join(f"{j:>{width}d}" for j in range(n))]
    for i in range(n):
        lines.append(f"  {i:>7d} " + " ".join(f"{cell(matrix[i][j]):>{width}s}" for j in range(n)))
    return lines


def _peer_lines():
    matrix = peer_access_matrix()
    if len(matrix) < 2:
        return ["  (fewer than two GPUs: no peer-to-peer pairs)"]
    return _matrix_lines(matrix, lambda ok: "yes" if ok else "no", 4)


def p2p_bandwidth_gbs(nbytes: int = 256 << 20, reps: int = 10):
    """Measured copy bandwidth in GB/s (bytes moved / time) from cuda:i to
    cuda:j for every ordered pair of visible GPUs; the diagonal is a copy
    within one GPU. Peer access is used where the driver allows it (PyTorch
    enables it on the first copy between the pair)."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = [[0.0] * n for _ in range(n)]
    for i in range(n):
        src = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{i}").random_()
        for j in range(n):
            dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{j}")
            dst.copy_(src)  # warm-up: enables peer access, creates the streams
            torch.cuda.synchronize(i)
            torch.cuda.synchronize(j)
            # A copy between GPUs runs on the source device's current stream.
            with torch.cuda.device(i):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    dst.copy_(src)
                end.record()
            end.synchronize()
            torch.cuda.synchronize(j)
            result[i][j] = nbytes * reps / (start.elapsed_time(end) * 1e-3) / 1e9
            del dst
    return result


def _bandwidth_lines():
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return ["  (fewer than two GPUs: nothing to measure)"]
    return _matrix_lines(p2p_bandwidth_gbs(), lambda gbs: f"{gbs:.1f}", 7)


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
        f"CPU vector ISA  {torch.ops.alexnet_ext._cpu_isa()} (ATEN_CPU_CAPABILITY picks it, as for PyTorch)",
        f"sync check      {'on' if torch.ops.alexnet_ext._sync_check_enabled() else 'off'}"
        " (ALEXNET_EXT_SYNC_CHECK=1: wait for and check every CUDA kernel as it is launched)",
        "GPUs:",
        *_gpu_lines(),
        "peer-to-peer access:",
        *_peer_lines(),
        "copy bandwidth GB/s (256 MiB, cuda:src -> cuda:dst):",
        *_bandwidth_lines(),
    ]
    return "\n".join(lines)


def main():
    print(report())


if __name__ == "__main__":
    main()
