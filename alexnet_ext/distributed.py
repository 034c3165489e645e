"""Data parallelism across processes and machines, around the (possibly
two-device) column model: torchrun + DistributedDataParallel.

    info = setup_distributed()                 # reads torchrun's environment
    model = place(AlexNet(...), info.devices)  # alexnet_ext.parallel.place
    model = wrap_ddp(model)                    # DDP with device_ids=None
    ...
    cleanup()

Launch (one machine, 4 processes; each takes two GPUs when the machine has 8):

    torchrun --standalone --nproc_per_node 4 -m alexnet_ext.train ...

Several machines (run on each, NODE_RANK = 0..NNODES-1):

    torchrun --nnodes 2 --node_rank $NODE_RANK --nproc_per_node 4 \\
             --master_addr $HEAD_NODE --master_port 29500 -m alexnet_ext.train ...

Device choice per process (``choose_devices``): with ``G`` visible GPUs and
``P`` processes on this machine (torchrun's LOCAL_WORLD_SIZE), process
``LOCAL_RANK`` takes GPUs ``2*LOCAL_RANK`` and ``2*LOCAL_RANK+1`` when
``G >= 2P`` (one column per GPU), else GPU ``LOCAL_RANK`` when ``G >= P``
(both columns on it, on two streams), else the CPU. NCCL is the backend on
GPUs, gloo on the CPU.
"""
import os
import time
from datetime import timedelta
from typing import List, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedInfo", "choose_devices", "setup_distributed", "wrap_ddp", "cleanup", "is_main_process"]


class DistributedInfo(NamedTuple):
    """What setup_distributed() returns; unpacks as (rank, world_size, local_rank, devices)."""
    rank: int
    world_size: int
    local_rank: int
    devices: List[torch.device]


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def choose_devices(local_rank: int, local_world_size: int, cuda_count: int) -> List[torch.device]:
    """The devices process ``local_rank`` of ``local_world_size`` on a machine
    with ``cuda_count`` GPUs uses: two GPUs, one, or the CPU (see module doc)."""
    if not 0 <= local_rank < local_world_size:
        raise ValueError(f"choose_devices: `local_rank` must be in [0, {local_world_size}), got {local_rank}")
    if cuda_count >= 2 * local_world_size:
        return [torch.device("cuda", 2 * local_rank), torch.device("cuda", 2 * local_rank + 1)]
    if cuda_count >= local_world_size:
        return [torch.device("cuda", local_rank)]
    return [torch.device("cpu")]


def setup_distributed(backend: str = None, timeout_s: float = 600.0, force_cpu: bool = False) -> DistributedInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), choose this process's
    devices and, when WORLD_SIZE > 1, initialise the process group (NCCL on
    GPUs, gloo on the CPU, unless `backend` says otherwise).

    Without torchrun's variables it is a single process: rank 0 of 1, and no
    process group. Returns ``DistributedInfo(rank, world_size, local_rank,
    devices)``. ``force_cpu=True`` ignores GPUs.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"setup_distributed: RANK={rank} and WORLD_SIZE={world_size} are inconsistent")
    cuda_count = 0 if force_cpu or not torch.cuda.is_available() else torch.cuda.device_count()
    devices = choose_devices(local_rank, local_world_size, cuda_count)
    if devices[0].type == "cuda":
        torch.cuda.set_device(devices[0])  # NCCL's communicator uses the current device
    if world_size > 1 and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if devices[0].type == "cuda" else "gloo"
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise RuntimeError(f"setup_distributed: WORLD_SIZE={world_size} but {var} is not set "
                                   "(launch with torchrun)")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    return DistributedInfo(rank, world_size, local_rank, devices)


def wrap_ddp(model: nn.Module, **kwargs) -> nn.Module:
    """``DistributedDataParallel(model, device_ids=None)``: the form DDP needs
    for a module spread over two devices (ColumnParallel), and which also
    serves one device or the CPU. Returns `model` unchanged when no process
    group is initialised (a single process), so one script serves both."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if kwargs.get("device_ids") is not None:
        raise ValueError("wrap_ddp: `device_ids` must be None for a model that may span two devices")
    kwargs["device_ids"] = None
    return nn.parallel.DistributedDataParallel(model, **kwargs)


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# How long cleanup() releases the GIL after destroying the process group (see there).
_GLOO_DRAIN_S = 0.05


def cleanup(synchronize: bool = True):
    """Destroy the process group, if there is one.

    ``synchronize=True`` (a normal end: every rank gets here) first meets the
    other ranks at a barrier, so that no rank tears its connections down while
    another still uses them. Pass ``False`` after an error, when the other
    ranks may never arrive.

    Then it sleeps briefly with the GIL released. gloo's worker threads outlive
    ``destroy_process_group`` (a DistributedDataParallel built on the group
    keeps it alive), and such a thread frees the last collective it ran only
    after the caller has its result; freeing that collective's tensors needs
    the GIL. Were the interpreter already shutting down, the thread would abort
    the whole process ("terminate called without an active exception", exit
    -6) after training had finished; we saw it in about 1 run in 40 of a
    two-process CPU job on a loaded machine, and none with the pause.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        try:
            dist.barrier()
        except RuntimeError:  # a rank died or timed out: nothing left to agree with
            pass
    dist.destroy_process_group()
    time.sleep(_GLOO_DRAIN_S)
