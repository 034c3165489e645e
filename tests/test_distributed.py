"""DistributedDataParallel around the column model, launched by torchrun:
two gloo processes on the CPU (loopback only) train a few steps; their
replicas stay identical and equal one process trained on the whole batch.

Run as a script (by torchrun, from the test) this file is the worker.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch

STEPS, PER_RANK, WORLD = 3, 2, 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_model():
    from test_models import small_model
    torch.manual_seed(1234)  # every process builds the same initial weights
    return small_model()


def batches():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(STEPS, PER_RANK * WORLD, 3, 67, 67, dtype=torch.float64, generator=g)
    y = torch.randint(0, 10, (STEPS, PER_RANK * WORLD), generator=g)
    return x, y


def train(model, rank=None):
    """SGD steps on this rank's share of each batch (all of it when rank is None)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs, ys = batches()
    for x, y in zip(xs, ys):
        if rank is not None:
            x, y = x[rank * PER_RANK:(rank + 1) * PER_RANK], y[rank * PER_RANK:(rank + 1) * PER_RANK]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return model


def state(model):
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    return {k: v.detach().cpu() for k, v in inner.state_dict().items()}


def worker(out_dir):
    from alexnet_ext.distributed import cleanup, setup_distributed, wrap_ddp
    from alexnet_ext.parallel import ColumnParallel, place
    info = setup_distributed(force_cpu=True)
    assert torch.distributed.get_backend() == "gloo" and info.world_size == WORLD
    assert info.devices == [torch.device("cpu")]
    model = wrap_ddp(place(make_model(), info.devices))
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    assert isinstance(model.module, ColumnParallel) and model.device_ids is None
    train(model, info.rank)
    torch.save(state(model), os.path.join(out_dir, f"rank{info.rank}.pt"))
    cleanup()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           os.path.abspath(__file__), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    replicas = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    initial = state(make_model())
    single = state(train(make_model()))
    for key in single:
        assert torch.equal(replicas[0][key], replicas[1][key]), key
        torch.testing.assert_close(replicas[0][key], single[key], rtol=1e-9, atol=1e-12)
    # The steps did move the weights (so the equalities above mean something).
    assert not torch.allclose(single["fc8.weight"], initial["fc8.weight"], rtol=0, atol=1e-4)
    assert not torch.equal(single["columns.1.conv1.weight"], initial["columns.1.conv1.weight"])


# ---------------------------------------------------------------- helpers

@pytest.mark.parametrize("local_rank, local_world, gpus, want", [
    (0, 1, 0, ["cpu"]), (1, 2, 0, ["cpu"]), (1, 2, 1, ["cpu"]),
    (0, 1, 1, ["cuda:0"]), (1, 2, 2, ["cuda:1"]), (2, 4, 7, ["cuda:2"]),
    (0, 1, 2, ["cuda:0", "cuda:1"]), (1, 2, 4, ["cuda:2", "cuda:3"]), (3, 4, 8, ["cuda:6", "cuda:7"]),
])
def test_choose_devices(local_rank, local_world, gpus, want):
    from alexnet_ext.distributed import choose_devices
    assert choose_devices(local_rank, local_world, gpus) == [torch.device(d) for d in want]


def test_choose_devices_rejects_bad_rank():
    from alexnet_ext.distributed import choose_devices
    with pytest.raises(ValueError, match="local_rank"):
        choose_devices(2, 2, 4)


def test_single_process_without_torchrun(monkeypatch):
    from alexnet_ext.distributed import setup_distributed, wrap_ddp
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    rank, world_size, local_rank, devices = setup_distributed(force_cpu=True)
    assert (rank, world_size, local_rank, devices) == (0, 1, 0, [torch.device("cpu")])
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(2, 2)
    assert wrap_ddp(model) is model


@pytest.mark.parametrize("env, error, match", [
    (dict(RANK="2", WORLD_SIZE="2"), ValueError, "RANK"),
    (dict(RANK="x", WORLD_SIZE="2"), ValueError, "RANK"),
    (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1"), RuntimeError, "MASTER_ADDR"),
])
def test_bad_environment(monkeypatch, env, error, match):
    from alexnet_ext.distributed import setup_distributed
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(error, match=match):
        setup_distributed(force_cpu=True)


if __name__ == "__main__":
    worker(sys.argv[1])
