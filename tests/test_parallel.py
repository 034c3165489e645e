"""ColumnParallel: one column per device, activations crossing only where the
paper's columns meet. On the CPU both columns sit on "cpu", which runs the
same forward, crossing and counting code as two GPUs."""
import copy

import pytest
import torch

from alexnet_ext.models import AlexNet
from alexnet_ext.parallel import ColumnParallel, count_crossings, place
from op_testing import HAS_CUDA, requires_cuda, tolerance
from test_models import reference_alexnet, small_model

TWO_GPUS = HAS_CUDA and torch.cuda.device_count() >= 2


def outputs_and_grads(model, x, upstream):
    x = x.clone().requires_grad_(True)
    out = model(x)
    params = [p for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0].removeprefix("module."))]
    grads = torch.autograd.grad(out, [x] + params, upstream.to(out.device))
    return out, grads


def assert_same_as_single_device(devices, dtype=torch.float64):
    """ColumnParallel over `devices` vs the unwrapped model on devices[0]
    (same kernels, same weights): outputs, input gradient and every
    parameter's gradient; both also equal the grouped functional reference."""
    single = small_model(dtype=dtype).to(devices[0])
    parallel = ColumnParallel(copy.deepcopy(single), devices)
    x = torch.randn(3, 3, 67, 67, dtype=dtype)
    upstream = torch.randn(3, 10, dtype=dtype)
    out, grads = outputs_and_grads(single, x.to(devices[0]), upstream)
    pout, pgrads = outputs_and_grads(parallel, x, upstream)
    tol = tolerance(dtype)
    assert pout.device == torch.device(devices[0])
    torch.testing.assert_close(pout, out, **tol)
    assert len(grads) == len(pgrads)
    for g, pg in zip(grads, pgrads):
        torch.testing.assert_close(pg.to(g.device), g, **tol)
    torch.testing.assert_close(out, reference_alexnet(single, x.to(devices[0])), **tolerance(dtype, 100))
    return parallel


def test_cpu_column_parallel_matches_single_device():
    parallel = assert_same_as_single_device(["cpu", "cpu"])
    assert parallel.devices == [torch.device("cpu")] * 2


def expected_crossings(n, pool2, features, direction):
    """(name, src, dst, shape) of one step's crossings, in order, for pool2
    outputs of pool2 x pool2 and pool5 outputs of features x features."""
    per_col = [("conv3", (n, 128, pool2, pool2)), ("fc6", (n, 128 * features ** 2)), ("fc7", (n, 2048))]
    out = [(name, 1 - dst, dst, shape) for name, shape in per_col for dst in (0, 1)]
    out.append(("fc8", 1, 0, (n, 2048)))
    if direction == "backward":  # gradients come back in reverse order
        out = out[::-1]
    return out


def test_crossings_per_step_at_224():
    """Exactly 7 activations cross per forward (conv3, fc6, fc7 both ways,
    fc8 one way) and their 7 gradients per backward, with the sizes the
    paper's columns exchange; with one column nothing crosses."""
    model = ColumnParallel(AlexNet(num_classes=10, dropout=0.0), ["cpu", "cpu"])
    n = 2
    x = torch.randn(n, 3, 224, 224)
    with count_crossings(model) as log:
        for step in range(2):
            model(x).sum().backward()
    assert len(log) == 28
    for step in range(2):
        records = log[14 * step:14 * (step + 1)]
        fwd = [(r.name, r.src_column, r.dst_column, r.shape) for r in records if r.direction == "forward"]
        bwd = [(r.name, r.src_column, r.dst_column, r.shape) for r in records if r.direction == "backward"]
        assert fwd == expected_crossings(n, 13, 6, "forward")
        assert sorted(bwd) == sorted(expected_crossings(n, 13, 6, "backward"))
        assert records[:7] == [r for r in records if r.direction == "forward"]  # all forward, then backward
    assert all(r.nbytes == 4 * torch.Size(r.shape).numel() for r in log)
    per_step_bytes = sum(r.nbytes for r in log[:7])
    assert per_step_bytes == 4 * n * (2 * 128 * 13 * 13 + 2 * 4608 + 2 * 2048 + 2048)
    assert {(r.src_device, r.dst_device) for r in log} == {("cpu", "cpu")}
    # Counting stops with the context; a one-column model has no crossings.
    model(x)
    assert len(log) == 28
    single = small_model(columns=1)
    with count_crossings(single) as log1:
        single(torch.randn(1, 3, 67, 67, dtype=torch.float64)).sum().backward()
    assert log1 == []


def test_unwrapped_model_counts_the_same_crossings():
    """The unwrapped two-column model goes through the same crossings."""
    model = small_model()
    with count_crossings(model) as log:
        model(torch.randn(2, 3, 67, 67, dtype=torch.float64))
    assert [(r.name, r.src_column, r.dst_column, r.shape) for r in log] == expected_crossings(2, 3, 1, "forward")


def test_place_chooses_the_layout():
    cpu = place(small_model(), [torch.device("cpu")])
    assert isinstance(cpu, ColumnParallel) and cpu.devices == [torch.device("cpu")] * 2
    one = small_model(columns=1)
    assert place(one, ["cpu"]) is one
    with pytest.warns(UserWarning, match="one device"):
        place(small_model(columns=1), ["cpu", "cpu"])
    with pytest.raises(ValueError, match="devices"):
        place(small_model(), [])


def test_bad_device_lists():
    with pytest.raises(ValueError, match="one device per column"):
        ColumnParallel(small_model(), ["cpu"])
    with pytest.raises(ValueError, match="one device per column"):
        ColumnParallel(small_model(), ["cpu", "cpu", "cpu"])
    with pytest.raises(TypeError, match="devices"):
        ColumnParallel(small_model(), "cpu")
    with pytest.raises(ValueError, match=r"devices\[1\]"):
        ColumnParallel(small_model(), ["cpu", "gpu:1"])
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 1}"
    with pytest.raises(RuntimeError, match=r"devices\[1\]"):
        ColumnParallel(small_model(), ["cpu", missing])
    with pytest.raises(TypeError, match="AlexNet"):
        ColumnParallel(torch.nn.Linear(2, 2), ["cpu", "cpu"])
    with pytest.raises(TypeError, match="column placement"):
        with count_crossings(torch.nn.Linear(2, 2)):
            pass


@requires_cuda
@pytest.mark.cuda
def test_one_gpu_two_streams_matches_single_device():
    parallel = assert_same_as_single_device(["cuda:0", "cuda:0"])
    streams = parallel.module.placement.streams
    assert streams[0] != streams[1]


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
@pytest.mark.cuda
def test_two_gpus_placement_and_equality():
    single = small_model()
    parallel = ColumnParallel(copy.deepcopy(single), ["cuda:0", "cuda:1"])
    for c, dev in enumerate(["cuda:0", "cuda:1"]):
        assert {p.device for p in parallel.module.columns[c].parameters()} == {torch.device(dev)}
    assert parallel.module.fc8.weight.device == torch.device("cuda:0")
    x = torch.randn(3, 3, 67, 67, dtype=torch.float64)
    with count_crossings(parallel) as log:
        out = parallel(x)
    assert out.device == torch.device("cuda:0")
    assert {(r.src_device, r.dst_device) for r in log} == {("cuda:0", "cuda:1"), ("cuda:1", "cuda:0")}
    assert_same_as_single_device(["cuda:0", "cuda:1"])


def test_compiled_column_parallel_matches_eager():
    """The placement's forward (streams off on the CPU) traces as one graph."""
    model = ColumnParallel(small_model(dtype=torch.float32), ["cpu", "cpu"])
    x = torch.randn(2, 3, 67, 67)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), model(x), **tolerance(torch.float32, 10))
