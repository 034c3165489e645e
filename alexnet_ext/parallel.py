"""Model parallelism the way the 2012 paper split AlexNet: one column per device.

``ColumnParallel(model, devices=("cuda:0", "cuda:1"))`` puts column 0 of a
two-column :class:`alexnet_ext.models.AlexNet` on the first device and column 1
on the second. The model's forward is unchanged: it always runs its columns
stage by stage through a :class:`ColumnPlacement`, and hands activations from
one column to another only through :meth:`ColumnPlacement.cross`. A model that
was never wrapped has a placement with no devices, where ``cross`` moves
nothing; so the single-device tests run the very code that two GPUs run.

The crossings, per forward step (N = batch, sizes for 224x224 inputs):

=========  =====================  ==========================  =============
crossing   from -> to             tensor                      copies
=========  =====================  ==========================  =============
conv3      each column -> other   pool2 output (N,128,13,13)  2
fc6        each column -> other   pool5, flattened (N,4608)   2
fc7        each column -> other   fc6 half (N,2048)           2
fc8        column 1 -> column 0   fc7 half (N,2048)           1
=========  =====================  ==========================  =============

fc8 is held whole by column 0 (so the logits come out on the first device and
are not gathered again); the gradients go back through the same crossings.

Devices and streams (the plan is :func:`plan_routes`; one :class:`Route` per
direction src -> dst):

- ``"cpu"`` (twice) or no devices: sequential; a crossing moves nothing
  (route ``none``), but is still counted.
- one CUDA device listed twice: both columns on it, each on its own compute
  stream, so the two columns' kernels run concurrently. A crossing copies
  nothing; the consumer's stream waits for an event the producer recorded
  right after computing the tensor (route ``event``).
- two devices: each column on its own GPU. Each direction has its own copy
  stream on the source GPU (and a landing stream on the destination GPU that
  only that direction uses, because PyTorch fences a cross-device copy with
  the destination's current stream too). The copy stream waits for the
  producer's event, copies, and records an event the consumer's stream waits
  for (route ``copy``). So the two directions' copies run at the same time,
  neither column's next stage queues behind its outgoing copy, and a column
  computes while the other's activation is in flight. Peer-to-peer is used
  when ``torch.cuda.can_device_access_peer`` allows it.

The producer's event is recorded when the model first hands a stage's outputs
to :meth:`ColumnPlacement.gather` (before any stream waits for the other
column), and ``Tensor.record_stream`` tells the caching allocator about every
stream that reads a tensor, so no memory is reused while a copy still reads
it. Gradients go back through the same copies: autograd runs each copy's
backward on the streams its forward used.
"""
import contextlib
import warnings
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = ["ColumnParallel", "ColumnPlacement", "Crossing", "Route", "count_crossings", "place", "plan_routes"]


class Crossing(NamedTuple):
    """One activation (forward) or gradient (backward) handed between columns."""
    name: str             # the layer whose input it is: "conv3", "fc6", "fc7", "fc8"
    direction: str        # "forward" or "backward"
    src_column: int       # forward source (for backward the gradient flows dst -> src)
    dst_column: int
    src_device: str
    dst_device: str
    shape: tuple
    nbytes: int


class Route(NamedTuple):
    """How a tensor produced by column `src` reaches column `dst`: which
    stream produced it, which streams move it, which stream consumes it
    (names; None where the route has no such stream)."""
    kind: str                  # "none", "event" (same GPU) or "copy" (different GPUs)
    producer: Optional[str]    # compute stream of the source column
    copy: Optional[str]        # the direction's copy stream, on the source GPU
    landing: Optional[str]     # the direction's stream on the destination GPU (PyTorch's copy fences it)
    consumer: Optional[str]    # compute stream of the destination column


def plan_routes(devices: Optional[Sequence]) -> Dict[Tuple[int, int], Route]:
    """The route of every ordered pair of columns for `devices` (one per
    column; None: wherever the data already is). Pure bookkeeping: it needs
    no GPU, so the plan is tested on any machine."""
    if devices is None:
        return {}
    devices = [torch.device(d) for d in devices]
    cuda = all(d.type == "cuda" for d in devices)
    routes = {}
    for src in range(len(devices)):
        for dst in range(len(devices)):
            if src == dst:
                continue
            if not cuda:
                routes[src, dst] = Route("none", None, None, None, None)
            elif devices[src] == devices[dst]:
                routes[src, dst] = Route("event", f"compute{src}", None, None, f"compute{dst}")
            else:
                routes[src, dst] = Route("copy", f"compute{src}", f"copy{src}to{dst}", f"landing{src}to{dst}",
                                         f"compute{dst}")
    return routes


def stream_devices(devices: Sequence, routes: Dict[Tuple[int, int], Route]) -> Dict[str, torch.device]:
    """{stream name: its device} for the streams `routes` use."""
    devices = [torch.device(d) for d in devices]
    out = {}
    for (src, dst), r in routes.items():
        for name, dev in ((r.producer, devices[src]), (r.copy, devices[src]), (r.landing, devices[dst]),
                          (r.consumer, devices[dst])):
            if name is not None:
                out[name] = dev
    return out


class CudaStreams:
    """The streams and events a placement uses, by name (see plan_routes).
    Tests substitute an object with the same methods that records the calls."""

    def __init__(self, devices: Dict[str, torch.device]):
        self.streams = {name: torch.cuda.Stream(device=d) for name, d in sorted(devices.items())}

    def use(self, name):
        return torch.cuda.stream(self.streams[name])

    def record(self, name):
        event = torch.cuda.Event()
        event.record(self.streams[name])
        return event

    def wait(self, name, event):
        self.streams[name].wait_event(event)

    def record_stream(self, tensor, name):
        tensor.record_stream(self.streams[name])

    def copy(self, x, device, route: Route):
        # PyTorch copies between GPUs on the source device's current stream and
        # fences the destination device's current stream: both are this
        # direction's own, so the copy orders against nothing else.
        with torch.cuda.stream(self.streams[route.landing]), torch.cuda.stream(self.streams[route.copy]):
            return x.to(device, non_blocking=True)

    def follow_caller(self, name):
        """Stream `name` waits for the work the caller queued on its device."""
        stream = self.streams[name]
        stream.wait_stream(torch.cuda.current_stream(stream.device))

    def hand_to_caller(self, tensor, name):
        """The caller's stream waits for stream `name`, which produced `tensor`."""
        caller = torch.cuda.current_stream(tensor.device)
        caller.wait_stream(self.streams[name])
        tensor.record_stream(caller)


class ColumnPlacement:
    """Where each column of a model runs, and the single place where
    activations move between columns.

    ``devices=None`` (what every model starts with) means "wherever the
    parameters and the input already are": nothing is moved and no stream is
    used. ``devices`` is one device per column otherwise. ``routes`` and
    ``streams`` default to plan_routes(devices) and, on GPUs, CudaStreams;
    tests pass their own to check the ordering on a CPU.
    """

    def __init__(self, columns: int, devices: Optional[Sequence] = None, routes=None, streams=None):
        self.columns = columns
        self.devices = None if devices is None else [torch.device(d) for d in devices]
        self.routes = plan_routes(self.devices) if routes is None else dict(routes)
        if streams is None and any(r.kind != "none" for r in self.routes.values()):
            streams = CudaStreams(stream_devices(self.devices, self.routes))
        self._streams = streams
        self._stage = None  # (a stage's outputs as given to gather, their producers' events)
        self.log: Optional[List[Crossing]] = None  # set by count_crossings()

    @property
    def streams(self):
        """The columns' compute streams (CUDA), or None."""
        if not isinstance(self._streams, CudaStreams):
            return None
        return [self._streams.streams[f"compute{c}"] for c in range(self.columns)]

    def device(self, column: int) -> Optional[torch.device]:
        return None if self.devices is None else self.devices[column]

    # -- streams -----------------------------------------------------------
    def begin(self):
        """Called once per forward, before any column runs: each column's
        stream waits for the work the caller queued on that device (the input,
        the optimizer's last parameter update)."""
        self._stage = None
        if self._streams is not None:
            for c in range(self.columns):
                self._streams.follow_caller(f"compute{c}")

    def on(self, column: int):
        """Context in which column `column` runs its layers."""
        if self._streams is None:
            return contextlib.nullcontext()
        return self._streams.use(f"compute{column}")

    def enter(self, x: torch.Tensor, column: int) -> torch.Tensor:
        """The model's input, on `column`'s device (call inside on(column))."""
        device = self.device(column)
        if device is None:
            return x
        y = x.to(device, non_blocking=True)
        if self._streams is not None and y is x:
            self._streams.record_stream(x, f"compute{column}")  # used on a side stream, freed by the caller
        return y

    def finish(self, out: torch.Tensor, column: int) -> torch.Tensor:
        """Hand the model's output, computed by `column`, back to the caller's stream."""
        self._stage = None
        if self._streams is not None:
            self._streams.hand_to_caller(out, f"compute{column}")
        return out

    # -- the crossings -------------------------------------------------------
    def cross(self, x: torch.Tensor, src: int, dst: int, name: str, ready=None) -> torch.Tensor:
        """Column `src`'s activation `x`, made available to column `dst`: one
        copy when their devices differ, none otherwise; recorded when counting.
        `ready`: the event marking `x` produced on `src`'s stream (recorded
        now when not given)."""
        if src == dst:
            return x
        if self.log is not None:
            self._record(name, "forward", src, dst, x)
        route = self.routes.get((src, dst))
        if route is None or route.kind == "none":
            device = self.device(dst)
            y = x if device is None else x.to(device)
        elif route.kind == "event":
            # Same GPU: no copy, only an ordering between the two streams.
            if ready is None:
                ready = self._streams.record(route.producer)
            self._streams.wait(route.consumer, ready)
            self._streams.record_stream(x, route.consumer)
            y = x
        else:
            if ready is None:
                ready = self._streams.record(route.producer)
            self._streams.wait(route.copy, ready)
            y = self._streams.copy(x, self.device(dst), route)
            self._streams.record_stream(x, route.copy)
            self._streams.wait(route.consumer, self._streams.record(route.copy))
            self._streams.record_stream(y, route.consumer)
        if self.log is not None and y.requires_grad:
            if y is x:  # no copy: a view of its own, so the hook sees only this crossing's gradient
                y = x.view_as(x)
            log = self.log
            y.register_hook(lambda g: self._record(name, "backward", src, dst, g, log))
        return y

    def gather(self, outputs: Sequence[torch.Tensor], dst: int, name: str) -> torch.Tensor:
        """All columns' outputs concatenated along dim 1 for column `dst`."""
        ready = [None] * len(outputs)
        if self._streams is not None:
            # The first gather of a stage marks every column's output produced,
            # while each producer's stream holds nothing but its stage: recorded
            # later (after this column's concatenation waited for an incoming
            # copy) the outgoing copy would wait for the incoming one.
            if self._stage is None or self._stage[0] is not outputs:
                self._stage = (outputs, [self._streams.record(f"compute{c}") for c in range(len(outputs))])
            ready = self._stage[1]
        parts = [self.cross(t, c, dst, name, ready[c]) for c, t in enumerate(outputs)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _record(self, name, direction, src, dst, t, log=None):
        log = self.log if log is None else log
        src_dev = str(self.device(src) or t.device)
        dst_dev = str(self.device(dst) or t.device)
        log.append(Crossing(name, direction, src, dst, src_dev, dst_dev, tuple(t.shape),
                            t.numel() * t.element_size()))


@contextlib.contextmanager
def count_crossings(model: nn.Module):
    """``with count_crossings(model) as log:`` records every crossing between
    columns (forward activations and backward gradients) in ``log``, a list
    of :class:`Crossing`. Works on an unwrapped model and on ColumnParallel."""
    placement = _placement_of(model)
    log: List[Crossing] = []
    previous, placement.log = placement.log, log
    try:
        yield log
    finally:
        placement.log = previous


def _placement_of(model: nn.Module) -> ColumnPlacement:
    inner = getattr(model, "module", model)  # ColumnParallel or DDP around it
    inner = getattr(inner, "module", inner)
    placement = getattr(inner, "placement", None)
    if not isinstance(placement, ColumnPlacement):
        raise TypeError(f"{type(model).__name__} has no column placement "
                        "(expected an alexnet_ext.models.AlexNet or a ColumnParallel around one)")
    return placement


def _check_device(device: torch.device, index: int):
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"ColumnParallel: devices[{index}] is {device} but CUDA is not available")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise RuntimeError(f"ColumnParallel: devices[{index}] is {device} but only {count} CUDA "
                               f"device(s) are visible")
    elif device.type != "cpu":
        raise ValueError(f"ColumnParallel: devices[{index}] must be a CPU or CUDA device, got {device}")


class ColumnParallel(nn.Module):
    """``ColumnParallel(model, devices=("cuda:0", "cuda:1"))``: run each column
    of ``model`` (an :class:`alexnet_ext.models.AlexNet`) on its own device.

    ``devices`` has one entry per column (``model.num_columns``); an entry may
    repeat (``("cuda:0", "cuda:0")``: both columns on one GPU, concurrently on
    two streams; ``("cpu", "cpu")``: sequential). Column ``c``'s layers move to
    ``devices[c]``; the layers shared by all columns (fc8) go with column 0,
    where the output also appears. The input may be on any device.

    The wrapper owns ``model`` as ``.module`` (so ``state_dict`` keys gain a
    ``module.`` prefix, as with DataParallel) and can itself be wrapped in
    DistributedDataParallel with ``device_ids=None``.
    """

    def __init__(self, model: nn.Module, devices=("cuda:0", "cuda:1")):
        super().__init__()
        columns = getattr(model, "num_columns", None)
        if columns is None or not hasattr(model, "column_modules"):
            raise TypeError("ColumnParallel: `model` must be an alexnet_ext.models.AlexNet, "
                            f"got {type(model).__name__}")
        if isinstance(devices, (str, torch.device)) or not isinstance(devices, Sequence):
            raise TypeError(f"ColumnParallel: `devices` must be a list of {columns} devices, got {devices!r}")
        if len(devices) != columns:
            raise ValueError(f"ColumnParallel: `devices` must list one device per column "
                             f"({columns}), got {len(devices)}: {list(devices)}")
        devs = []
        for i, d in enumerate(devices):
            try:
                dev = torch.device(d)
            except (RuntimeError, TypeError) as err:
                raise ValueError(f"ColumnParallel: devices[{i}] is not a device: {d!r}") from err
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
            _check_device(dev, i)
            devs.append(dev)
        if len({d.type for d in devs}) > 1:
            raise ValueError(f"ColumnParallel: `devices` must be all CPU or all CUDA, got {devs}")
        self.devices = devs
        self.module = model
        for c, modules in enumerate(model.column_modules()):
            for m in modules:
                m.to(devs[c])
        model.placement = ColumnPlacement(columns, devs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def place(model: nn.Module, devices: Sequence) -> nn.Module:
    """Put `model` (an AlexNet) on the devices one process uses, as chosen by
    :func:`alexnet_ext.distributed.choose_devices`: two devices -> one column
    on each; one CUDA device -> both columns on it, on two streams; the CPU
    -> unchanged structure, sequential. A one-column model goes to the first
    device as a whole (with a warning when a second one was offered)."""
    devices = [torch.device(d) for d in devices]
    if not devices or len(devices) > 2:
        raise ValueError(f"place: `devices` must list one or two devices, got {devices}")
    columns = getattr(model, "num_columns", 1)
    if columns == 1:
        if len(devices) != 1:
            warnings.warn(f"place: a one-column model runs on one device; using {devices[0]} "
                          f"of {devices}")
        return model.to(devices[0])
    return ColumnParallel(model, devices if len(devices) == columns else devices[:1] * columns)
