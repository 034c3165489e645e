"""Training throughput: our AlexNet against the same network from plain
torch.nn layers, the two-column model on one GPU (two streams) with the share
of its time that overlaps, and the input pipeline's images/second per worker.

    python benchmarks/bench_train.py [--out DIR] [--quick] [--data ROOT] [--cpu-compile]

Training: images/second of one SGD step (forward, loss, backward, update) for
alexnet_ext.models.AlexNet and for the same two-column network built from
torch.nn.Conv2d(groups=2)+ReLU, LocalResponseNorm and MaxPool2d, on synthetic
inputs generated on the device (the input pipeline is not measured).

- GPU: batch 128 and 256, float32 and bfloat16 (autocast), channels_last,
  cudnn.benchmark, eager and under torch.compile; our model's step captured
  as a CUDA graph (as --cuda-graphs does); the two-column model on one GPU
  (its columns on two streams, ColumnParallel(["cuda:0", "cuda:0"])) with the
  share of the columns' kernel time during which the other column also ran,
  and with two GPUs the share of the crossing copies' time hidden under
  kernels, both from a torch.profiler trace (alexnet_ext.overlap).
- CPU (always): batch 8 and 16, float32 NCHW and bfloat16 channels_last,
  eager. torch.compile of the whole network takes minutes on a small CPU, so
  its CPU rows run only with --cpu-compile.

Input pipeline: the training transform (decode, resize, crop, flip, PCA
lighting, mean subtraction) in one process on --data (default:
../shared/data/flowers12 when present), i.e. images/second per worker.

Writes train_<device>.{csv,md,png} and data_pipeline_cpu.{csv,md} under --out.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from alexnet_ext import data as D  # noqa: E402
from alexnet_ext.models import AlexNet  # noqa: E402

FLOWERS12 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data",
                         "flowers12")


def plain_alexnet(num_classes=1000, dropout=0.5):
    """The paper's two-column network from stock torch.nn layers: the
    columns' private connections (conv2, conv4, conv5) are groups=2
    convolutions; LRN with the paper's alpha (1e-4 per neighbour, i.e.
    alpha=5e-4 in PyTorch's divided convention), k=2."""
    def conv(cin, cout, k, s=1, p=0, groups=1):
        return [nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=groups), nn.ReLU(inplace=True)]
    lrn = lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    return nn.Sequential(
        *conv(3, 96, 11, 4, 2), lrn(), nn.MaxPool2d(3, 2),
        *conv(96, 256, 5, 1, 2, groups=2), lrn(), nn.MaxPool2d(3, 2),
        *conv(256, 384, 3, 1, 1), *conv(384, 384, 3, 1, 1, groups=2), *conv(384, 256, 3, 1, 1, groups=2),
        nn.MaxPool2d(3, 2), nn.Flatten(),
        nn.Dropout(dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
        nn.Dropout(dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))


def train_step_fn(model, batch, device, dtype, channels_last):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    xs = [torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt) * 60 for _ in range(2)]
    ys = [torch.randint(0, 1000, (batch,), device=device) for _ in range(2)]
    amp = dtype != torch.float32

    def step(i):
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=amp):
            logits = model(xs[i % 2])
        loss = F.cross_entropy(logits.float(), ys[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def graphed_step_fn(model, batch, dtype, channels_last):
    """The same step captured as one CUDA graph (PyTorch's whole-network
    recipe, as alexnet_ext.train --cuda-graphs does) and replayed."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(batch, 3, 224, 224, device="cuda") * 60).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    amp = dtype != torch.float32

    def eager():
        with torch.autocast(device_type="cuda", dtype=dtype, enabled=amp, cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            eager()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager()
    return lambda i: graph.replay()


def measure(report, name, build, step_fn, args, **columns):
    """Times one configuration and adds its row; returns images/s or None."""
    device = args.device
    reps = args.reps if device == "cuda" else max(2, args.reps // 10)
    warmup = args.warmup if device == "cuda" else 1
    try:
        model = build()
        step = step_fn(model)
        ms, (p10, p90) = harness.time_ms(step, device, 2, warmup, reps)
    except Exception as err:  # e.g. a compile or capture failure: report, keep going
        report.note(f"{name} {columns}: skipped ({type(err).__name__}: {err})"[:300])
        return None
    rate = columns["batch"] / (ms * 1e-3)
    report.add(**columns, impl=name, ms_per_step=ms, ms_p10=p10, ms_p90=p90, images_per_s=rate)
    del model, step
    if device == "cuda":
        torch.cuda.empty_cache()
    return rate


def bench_training(report, args):
    device = args.device
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        batches, configs, compiles = (128, 256), ((torch.float32, True), (torch.bfloat16, True)), (False, True)
    else:
        report.note("No GPU visible: every CUDA row (batch 128/256, float32/bfloat16 channels_last, eager, "
                    "torch.compile, CUDA graph, two columns on two streams) was skipped; the GPU targets of "
                    "issue 13 are unmeasured. CPU rows: batch 8/16, eager"
                    + (" and torch.compile." if args.cpu_compile else
                       "; torch.compile CPU rows skipped (minutes of compilation here; pass --cpu-compile)."))
        batches, configs = (8, 16), ((torch.float32, False), (torch.bfloat16, True))
        if hasattr(os, "getloadavg"):
            report.note(f"CPU load average (1/5/15 min) when the CPU rows started: "
                        f"{' / '.join(f'{v:.1f}' for v in os.getloadavg())} on {os.cpu_count()} cores "
                        "(other processes share them: compare rows of one run, not across runs).")
        compiles = (False, True) if args.cpu_compile else (False,)
    for batch in batches:
        for dtype, channels_last in configs:
            for compiled in compiles:
                columns = dict(batch=batch, dtype=str(dtype).replace("torch.", ""),
                               layout="channels_last" if channels_last else "nchw",
                               mode="compile" if compiled else "eager")
                rate = {}
                for name, make in (("ours", lambda: AlexNet(1000, init="default")),
                                   ("torch.nn", lambda: plain_alexnet(1000))):
                    def build(make=make):
                        model = make().to(device)
                        if channels_last:
                            model = model.to(memory_format=torch.channels_last)
                        return torch.compile(model) if compiled else model
                    step_fn = lambda m: train_step_fn(m, batch, device, dtype, channels_last)
                    rate[name] = measure(report, name, build, step_fn, args, **columns)
                if rate["ours"] and rate["torch.nn"]:
                    report.add(**columns, impl="speedup ours / torch.nn", speedup=rate["ours"] / rate["torch.nn"])
            if device == "cuda":
                graphed = measure(report, "ours, CUDA graph", lambda: AlexNet(1000, init="default").cuda().to(
                    memory_format=torch.channels_last if channels_last else torch.contiguous_format),
                    lambda m: graphed_step_fn(m, batch, dtype, channels_last), args, **dict(columns, mode="graph"))
                del graphed
                bench_columns(report, args, batch, dtype, channels_last)


def bench_columns(report, args, batch, dtype, channels_last):
    """The two-column model with both columns on one GPU (two streams), and
    on two GPUs when there are two: images/s, and from a profiled step the
    overlap of the columns' kernels and of the crossing copies."""
    from torch.profiler import ProfilerActivity, profile
    from alexnet_ext.overlap import concurrent_share, gpu_events, hidden_share
    from alexnet_ext.parallel import ColumnParallel
    layouts = [["cuda:0", "cuda:0"]] + ([["cuda:0", "cuda:1"]] if torch.cuda.device_count() >= 2 else [])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for devices in layouts:
        columns = dict(batch=batch, dtype=str(dtype).replace("torch.", ""),
                       layout="channels_last" if channels_last else "nchw", mode="eager")
        name = "two columns, " + ("one GPU (2 streams)" if devices[0] == devices[1] else "two GPUs")
        build = lambda: ColumnParallel(AlexNet(1000, init="default").to(memory_format=fmt), devices)
        measure(report, name, build, lambda m: train_step_fn(m, batch, "cuda", dtype, channels_last), args,
                **columns)
        model = build()
        x = (torch.randn(batch, 3, 224, 224, device="cuda") * 60).contiguous(memory_format=fmt)

        def fwd_bwd():
            with torch.autocast(device_type="cuda", dtype=dtype, enabled=dtype != torch.float32):
                out = model(x)
            out.float().sum().backward()
        for _ in range(3):
            fwd_bwd()
        for d in set(devices):
            torch.cuda.synchronize(d)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fwd_bwd()
            for d in set(devices):
                torch.cuda.synchronize(d)
        events = gpu_events(prof)
        report.add(**columns, impl=name + ": overlap (profiled forward+backward)",
                   columns_concurrent_share=concurrent_share(events), crossing_hidden_share=hidden_share(events))
        del model
        torch.cuda.empty_cache()


def bench_data(args):
    """Images/second of the training and evaluation transforms in one process."""
    root = args.data or FLOWERS12
    pargs = argparse.Namespace(**vars(args))
    pargs.device = "cpu"
    report = harness.Report("data_pipeline", pargs, title="Input pipeline, one worker (images/second)")
    if not os.path.isdir(root):
        report.note(f"{root} not found: input pipeline not measured (pass --data ROOT)")
        report.write()
        return
    # A DataLoader worker runs with one torch thread; measure the same way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    report.note(f"data: {os.path.abspath(root)}; one process with one torch thread, as a DataLoader worker")
    n = 48 if args.quick else 240
    for name, tf, split in (("train: decode+resize+random crop/flip+lighting+mean", D.TrainTransform(), "train"),
                            ("eval: decode+resize+centre crop+mean", D.EvalTransform(), "val"),
                            ("eval ten-crop", D.EvalTransform(ten_crop=True), "val")):
        ds = D.ImageFolderDataset(root, split, tf)
        count = min(n, len(ds))
        ds[0]  # warm the file cache and imports
        t0 = time.perf_counter()
        for i in range(count):
            ds[(i * 7 % len(ds), 0)]
        secs = time.perf_counter() - t0
        report.add(transform=name, images=count, seconds=secs, images_per_s=count / secs)
    torch.set_num_threads(threads)
    report.write()


def main(argv=None):
    def extra(ap):
        ap.add_argument("--data", default=None,
                        help="image folder for the input-pipeline rows (default: flowers12 when present)")
        ap.add_argument("--cpu-compile", action="store_true",
                        help="also the torch.compile rows on the CPU (minutes of compilation on a small machine)")
        ap.add_argument("--no-data", action="store_true", help="skip the input-pipeline rows")
    args = harness.parse_args(__doc__, argv, extra=extra)
    report = harness.Report("train", args, title="AlexNet training throughput (images/second)")
    bench_training(report, args)
    report.write(plot=("batch", "images_per_s", "impl"))
    if not args.no_data:
        bench_data(args)


if __name__ == "__main__":
    main()
