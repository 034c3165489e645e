"""ColumnParallel: one column per device, activations crossing only where the
paper's columns meet. On the CPU both columns sit on "cpu", which runs the
same forward, crossing and counting code as two GPUs."""
import contextlib
import copy

import pytest
import torch

from alexnet_ext.models import AlexNet
from alexnet_ext.parallel import ColumnParallel, ColumnPlacement, count_crossings, place, plan_routes, stream_devices
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


# --------------------------------------------------------------------------
# The stream plan, checked on the CPU
# --------------------------------------------------------------------------

def test_plan_routes_per_layout():
    assert plan_routes(None) == {}
    assert {r.kind for r in plan_routes(["cpu", "cpu"]).values()} == {"none"}
    one_gpu = plan_routes(["cuda:0", "cuda:0"])
    assert set(one_gpu) == {(0, 1), (1, 0)}
    for (src, dst), r in one_gpu.items():
        assert (r.kind, r.producer, r.consumer, r.copy, r.landing) == \
            ("event", f"compute{src}", f"compute{dst}", None, None)
    two = plan_routes(["cuda:0", "cuda:1"])
    assert all(r.kind == "copy" for r in two.values())
    # Each direction owns its copy and landing streams: nothing is shared
    # between directions or with a column's compute stream.
    names = [(r.copy, r.landing) for r in two.values()]
    flat = [n for pair in names for n in pair]
    assert len(set(flat)) == 4 and not any(n.startswith("compute") for n in flat)
    where = stream_devices(["cuda:0", "cuda:1"], two)
    for (src, dst), r in two.items():
        assert where[r.copy] == torch.device("cuda", src)       # issued on the source GPU
        assert where[r.landing] == torch.device("cuda", dst)    # the destination side of the fence
        assert where[r.producer] == torch.device("cuda", src) and where[r.consumer] == torch.device("cuda", dst)


class RecordingStreams:
    """Stands in for CudaStreams on the CPU: copies are clones, and every
    stream operation is logged, so the order the placement imposes on a GPU
    can be checked here."""

    def __init__(self):
        self.ops = []

    @contextlib.contextmanager
    def use(self, name):
        yield

    def record(self, name):
        event = len(self.ops)
        self.ops.append(("record", name, event))
        return event

    def wait(self, name, event):
        self.ops.append(("wait", name, event))

    def record_stream(self, tensor, name):
        self.ops.append(("record_stream", name, id(tensor)))

    def copy(self, x, device, route):
        self.ops.append(("copy", route.copy, route.landing))
        return x.to(device).clone()

    def follow_caller(self, name):
        self.ops.append(("follow", name, None))

    def hand_to_caller(self, tensor, name):
        self.ops.append(("hand", name, None))


def happens_before(ops):
    """{op index: set of op indices it waits for (transitively)}: an op
    follows the previous op on its stream, and a wait follows the record of
    its event (CUDA stream semantics)."""
    deps, last_on = {}, {}
    for i, (kind, stream, arg) in enumerate(ops):
        d = set()
        if stream in last_on:
            d |= {last_on[stream]} | deps[last_on[stream]]
        if kind == "wait":
            d |= {arg} | deps[arg]
        deps[i] = d
        last_on[stream] = i
    return deps


@pytest.mark.parametrize("layout", [["cuda:0", "cuda:1"], ["cuda:0", "cuda:0"]])
def test_stream_order_lets_directions_overlap(layout):
    """The placement's stream operations for a two-GPU (or one-GPU) forward,
    recorded on the CPU: the result is bit-identical to the unwrapped model;
    every copy waits for its producer and the consumer for the copy; and
    within a stage neither direction waits for the other (the fault of a
    copy issued on the compute streams, or of an event recorded late)."""
    model = small_model()
    plain = copy.deepcopy(model)
    rec = RecordingStreams()
    model.placement = ColumnPlacement(2, ["cpu", "cpu"], routes=plan_routes(layout), streams=rec)
    x = torch.randn(2, 3, 67, 67, dtype=torch.float64)
    out = model(x)
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    out.sum().backward()
    plain(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)

    ops, deps = rec.ops, happens_before(rec.ops)
    events = {i: stream for i, (kind, stream, _) in enumerate(ops) if kind == "record"}
    two_gpus = layout[0] != layout[1]
    # The crossing waits, in the model's order: conv3, fc6, fc7 (1->0 then
    # 0->1), fc8 (1->0). On two GPUs each has a copy.
    if two_gpus:
        copies = [i for i, op in enumerate(ops) if op[0] == "copy"]
        assert [ops[i][1] for i in copies] == ["copy1to0", "copy0to1"] * 3 + ["copy1to0"]
        for a, b in zip(copies[0:6:2], copies[1:6:2]):
            assert a not in deps[b] and b not in deps[a], "the two directions of a stage are serialised"
        for i in copies:
            src = ops[i][1][4]
            waits = [ops[j][2] for j in deps[i] if ops[j][0] == "wait" and ops[j][1] == ops[i][1]]
            assert waits and all(events[e] == f"compute{src}" for e in waits)  # only its producer
    consumer_waits = [(stream, events[e]) for kind, stream, e in ops if kind == "wait" and stream.startswith("compute")]
    expected = "copy{0}to{1}" if two_gpus else "compute{0}"
    assert consumer_waits == [("compute0", expected.format(1, 0)), ("compute1", expected.format(0, 1))] * 3 + \
        [("compute0", expected.format(1, 0))]
    # A stage's outputs are marked produced before anything waits for either
    # of them: recorded later, a producer's event would sit behind its own
    # column's wait for the other column's tensor.
    producer_waits = [i for i, op in enumerate(ops) if op[0] == "wait" and events[op[2]].startswith("compute")]
    assert len(producer_waits) == 7
    for stage in range(3):
        pair = producer_waits[2 * stage:2 * stage + 2]
        assert all(ops[w][2] < pair[0] for w in pair)
    # Every stream that reads a crossing tensor is made known to the allocator.
    assert sum(op[0] == "record_stream" for op in ops) >= (14 if two_gpus else 7)
    assert ops[0][0] == "follow" and ops[-1][0] == "hand"


# --------------------------------------------------------------------------
# Overlap on a GPU (skipped without one)
# --------------------------------------------------------------------------

def test_overlap_arithmetic():
    from alexnet_ext import overlap
    assert overlap.merge([(5, 7), (0, 2), (1, 3), (4, 4)]) == [(0, 3), (5, 7)]
    assert overlap.covered([(0, 10)], [(2, 4), (3, 5), (8, 20)]) == 5
    events = [("memcpy", 9, 0, 10), ("kernel", 9, 10, 20), ("kernel", 7, 5, 15),
              ("memcpy", 8, 30, 40), ("kernel", 7, 35, 36)]
    # Copy on stream 9: 5 of 10 us under stream 7's kernel; stream 8: 1 of 10.
    assert overlap.hidden_share(events) == pytest.approx(6 / 20)
    assert overlap.hidden_share([("kernel", 7, 0, 1)]) is None
    # Streams 7 (11 us) and 9 (10 us) overlap 5 us: each counts it.
    assert overlap.concurrent_share(events) == pytest.approx(10 / 21)
    trace = {"traceEvents": [{"cat": "kernel", "ts": 1, "dur": 2, "args": {"stream": 7}},
                             {"cat": "gpu_memcpy", "ts": 2, "dur": 1, "args": {"stream": 9}},
                             {"cat": "cpu_op", "ts": 0, "dur": 9}]}
    assert overlap.events_from_trace(trace) == [("kernel", 7, 1.0, 3.0), ("memcpy", 9, 2.0, 3.0)]


@requires_cuda
@pytest.mark.cuda
def test_one_gpu_columns_overlap_and_match():
    """Both columns on one GPU run concurrently: some column-1 kernel time
    overlaps column-0 kernel time, and the result equals the unwrapped model."""
    from torch.profiler import ProfilerActivity, profile
    model = AlexNet(num_classes=10, dropout=0.0, init="default").cuda()
    parallel = ColumnParallel(copy.deepcopy(model), ["cuda:0", "cuda:0"])
    x = torch.randn(128, 3, 224, 224, device="cuda")
    torch.testing.assert_close(parallel(x), model(x), **tolerance(torch.float32, 10))
    for _ in range(3):
        parallel(x).sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        parallel(x).sum().backward()
        torch.cuda.synchronize()
    from alexnet_ext.overlap import concurrent_share, gpu_events
    share = concurrent_share(gpu_events(prof))
    assert share is not None and share > 0.0, share


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
@pytest.mark.cuda
def test_two_gpus_copies_hidden_under_compute():
    """On two GPUs at least 70% of the crossing copies' time runs under
    kernels of other streams (the issue's target), after warm-up."""
    from torch.profiler import ProfilerActivity, profile
    from alexnet_ext.overlap import gpu_events, hidden_share
    parallel = ColumnParallel(AlexNet(num_classes=1000, dropout=0.0, init="default"), ["cuda:0", "cuda:1"])
    x = torch.randn(256, 3, 224, 224, device="cuda:0")
    for _ in range(3):
        parallel(x).sum().backward()
    torch.cuda.synchronize("cuda:0"), torch.cuda.synchronize("cuda:1")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        parallel(x).sum().backward()
        torch.cuda.synchronize("cuda:0"), torch.cuda.synchronize("cuda:1")
    share = hidden_share(gpu_events(prof))
    assert share is not None and share >= 0.7, share
