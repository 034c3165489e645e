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

Devices:

- two devices: each column on its own; a crossing is one device-to-device copy
  (peer-to-peer when ``torch.cuda.can_device_access_peer`` allows it; PyTorch
  enables peer access on the first such copy).
- one CUDA device listed twice: both columns on it, each on its own CUDA
  stream, so the two columns' kernels run concurrently.
- ``"cpu"`` (twice): sequential; the crossings are counted but copy nothing.

On CUDA every column runs on a side stream of its device. A crossing's copy is
issued on the source column's stream right after that column's stage, and the
destination stream waits for it only when it needs the data, so one column's
compute overlaps the other column's copy.
"""
import contextlib
import warnings
from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import nn

__all__ = ["ColumnParallel", "ColumnPlacement", "Crossing", "count_crossings", "place"]


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


class ColumnPlacement:
    """Where each column of a model runs, and the single place where
    activations move between columns.

    ``devices=None`` (what every model starts with) means "wherever the
    parameters and the input already are": nothing is moved and no stream is
    used. ``devices`` is one device per column otherwise.
    """

    def __init__(self, columns: int, devices: Optional[Sequence] = None):
        self.columns = columns
        self.devices = None if devices is None else [torch.device(d) for d in devices]
        self.streams = None
        if self.devices is not None and all(d.type == "cuda" for d in self.devices):
            # A side stream per column: on one GPU the two columns run
            # concurrently; on two GPUs copies overlap the other column's work.
            self.streams = [torch.cuda.Stream(device=d) for d in self.devices]
        self.log: Optional[List[Crossing]] = None  # set by count_crossings()

    def device(self, column: int) -> Optional[torch.device]:
        return None if self.devices is None else self.devices[column]

    # -- streams -----------------------------------------------------------
    def begin(self):
        """Called once per forward, before any column runs: each column's
        stream waits for the work the caller queued on that device (the input,
        the optimizer's last parameter update)."""
        if self.streams is not None:
            for s in self.streams:
                s.wait_stream(torch.cuda.current_stream(s.device))

    def on(self, column: int):
        """Context in which column `column` runs its layers."""
        if self.streams is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.streams[column])

    def enter(self, x: torch.Tensor, column: int) -> torch.Tensor:
        """The model's input, on `column`'s device (call inside on(column))."""
        device = self.device(column)
        if device is None:
            return x
        y = x.to(device, non_blocking=True)
        if self.streams is not None and y is x:
            x.record_stream(self.streams[column])  # used on a side stream, freed by the caller
        return y

    def finish(self, out: torch.Tensor, column: int) -> torch.Tensor:
        """Hand the model's output, computed by `column`, back to the caller's stream."""
        if self.streams is not None:
            caller = torch.cuda.current_stream(out.device)
            caller.wait_stream(self.streams[column])
            out.record_stream(caller)
        return out

    # -- the crossings -------------------------------------------------------
    def cross(self, x: torch.Tensor, src: int, dst: int, name: str) -> torch.Tensor:
        """Column `src`'s activation `x`, made available to column `dst`: one
        copy when their devices differ, none otherwise; recorded when counting."""
        if src == dst:
            return x
        device = self.device(dst)
        if self.log is not None:
            self._record(name, "forward", src, dst, x)
        if device is None:
            y = x
        elif self.streams is None:
            y = x.to(device)
        else:
            s_src, s_dst = self.streams[src], self.streams[dst]
            if s_src.device == s_dst.device:
                # Same GPU: no copy, only an ordering between the two streams.
                s_dst.wait_stream(s_src)
                x.record_stream(s_dst)
                y = x
            else:
                # PyTorch copies between GPUs on the source device's current
                # stream and makes the destination's current stream wait, so
                # both column streams are made current for the copy.
                with torch.cuda.stream(s_src), torch.cuda.stream(s_dst):
                    y = x.to(device, non_blocking=True)
        if self.log is not None and y.requires_grad:
            if y is x:  # no copy: a view of its own, so the hook sees only this crossing's gradient
                y = x.view_as(x)
            log = self.log
            y.register_hook(lambda g: self._record(name, "backward", src, dst, g, log))
        return y

    def gather(self, outputs: Sequence[torch.Tensor], dst: int, name: str) -> torch.Tensor:
        """All columns' outputs concatenated along dim 1 for column `dst`."""
        parts = [self.cross(t, c, dst, name) for c, t in enumerate(outputs)]
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
