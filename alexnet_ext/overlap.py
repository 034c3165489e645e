"""How much of one kind of GPU work ran while other GPU work ran, read from a
torch.profiler (Kineto) trace: the measure behind "crossing time hidden under
compute" and "the two columns run concurrently".

The interval arithmetic is plain Python on (start, end) pairs, so it is tested
anywhere; only making a trace needs a GPU:

    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        ...
    events = gpu_events(prof)                  # [(kind, stream, start_us, end_us)]
    copy_share = hidden_share(events, "memcpy")
    column_share = concurrent_share(events)
"""
import json
import os
import tempfile
from typing import Iterable, List, Optional, Tuple

Interval = Tuple[float, float]


def merge(intervals: Iterable[Interval]) -> List[Interval]:
    """The union of `intervals` as sorted, disjoint intervals."""
    out: List[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def total(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in merge(intervals))


def covered(work: Iterable[Interval], cover: Iterable[Interval]) -> float:
    """Length of (union of `work`) intersected with (union of `cover`)."""
    a, b = merge(work), merge(cover)
    i = j = 0
    length = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if hi > lo:
            length += hi - lo
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return length


def gpu_events(prof) -> List[Tuple[str, int, float, float]]:
    """(kind, stream, start_us, end_us) of every kernel ("kernel") and
    memory copy ("memcpy") in a finished torch.profiler profile, read from
    its Chrome trace (which names each event's stream)."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    return events_from_trace(trace)


def events_from_trace(trace: dict) -> List[Tuple[str, int, float, float]]:
    out = []
    for e in trace.get("traceEvents", []):
        cat = e.get("cat", "")
        if cat not in ("kernel", "gpu_memcpy") or "dur" not in e:
            continue
        stream = (e.get("args") or {}).get("stream", -1)
        kind = "kernel" if cat == "kernel" else "memcpy"
        out.append((kind, int(stream), float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    return out


def hidden_share(events, kind="memcpy") -> Optional[float]:
    """Share of the time spent in `kind` events (the crossings' copies) during
    which a kernel ran on another stream; None when there were none."""
    work = [(s, e) for k, _, s, e in events if k == kind]
    if not work:
        return None
    hidden = 0.0
    for stream in {st for k, st, _, _ in events if k == kind}:
        mine = [(s, e) for k, st, s, e in events if k == kind and st == stream]
        others = [(s, e) for k, st, s, e in events if k == "kernel" and st != stream]
        hidden += covered(mine, others)
    return hidden / total(work) if total(work) > 0 else None


def concurrent_share(events) -> Optional[float]:
    """For the two streams with the most kernel time (the two columns when a
    forward+backward of the two-column model on one GPU is profiled): the
    share of their kernel time during which the other one also ran a kernel."""
    per_stream = {}
    for k, st, s, e in events:
        if k == "kernel":
            per_stream.setdefault(st, []).append((s, e))
    if len(per_stream) < 2:
        return None
    a, b = sorted(per_stream.values(), key=total, reverse=True)[:2]
    busy = total(a) + total(b)
    return (covered(a, b) + covered(b, a)) / busy if busy > 0 else None
