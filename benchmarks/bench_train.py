"""Training throughput: our AlexNet against the same network from plain
torch.nn layers, and the input pipeline's images/second per worker.

    python benchmarks/bench_train.py [--out DIR] [--quick] [--data ROOT]

Training: images/second of one SGD step (forward, loss, backward, update) at
batch 128 and 256 for alexnet_ext.models.AlexNet and for the same two-column
network built from torch.nn.Conv2d(groups=2)+ReLU, LocalResponseNorm and
MaxPool2d; float32 and bfloat16 (autocast), channels_last, with
cudnn.benchmark, eager and under torch.compile. Inputs are generated on the
GPU, so the input pipeline is not measured. On a CPU only a small smoke
measurement (batch 8, float32, eager) runs and every CUDA row is reported as
skipped.

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
        with torch.autocast(device_type=device, dtype=dtype, enabled=amp):
            logits = model(xs[i % 2])
        loss = F.cross_entropy(logits.float(), ys[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def bench_training(report, args):
    device = args.device
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        batches, dtypes, layouts, compiles = (128, 256), (torch.float32, torch.bfloat16), (True,), (False, True)
    else:
        report.note("No GPU visible: every CUDA row (batch 128/256, float32/bfloat16, eager/torch.compile) "
                    "was skipped; CPU smoke rows only (batch 8, float32, eager).")
        batches, dtypes, layouts, compiles = (8,), (torch.float32,), (False,), (False,)
    reps = args.reps if device == "cuda" else max(2, args.reps // 10)
    warmup = args.warmup if device == "cuda" else 1
    for batch in batches:
        for dtype in dtypes:
            for channels_last in layouts:
                for compiled in compiles:
                    rate = {}
                    for name, build in (("ours", lambda: AlexNet(1000, init="default")),
                                        ("torch.nn", lambda: plain_alexnet(1000))):
                        model = build().to(device)
                        if channels_last:
                            model = model.to(memory_format=torch.channels_last)
                        if compiled:
                            model = torch.compile(model)
                        step = train_step_fn(model, batch, device, dtype, channels_last)
                        try:
                            ms, (p10, p90) = harness.time_ms(step, device, 2, warmup, reps)
                        except Exception as err:  # e.g. a compile failure: report, keep going
                            report.note(f"{name} batch {batch} {dtype} compile={compiled}: skipped "
                                        f"({type(err).__name__}: {err})"[:300])
                            continue
                        rate[name] = batch / (ms * 1e-3)
                        report.add(batch=batch, dtype=str(dtype).replace("torch.", ""),
                                   layout="channels_last" if channels_last else "nchw",
                                   mode="compile" if compiled else "eager", impl=name,
                                   ms_per_step=ms, ms_p10=p10, ms_p90=p90, images_per_s=rate[name])
                        del model, step
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    if len(rate) == 2:
                        report.add(batch=batch, dtype=str(dtype).replace("torch.", ""),
                                   layout="channels_last" if channels_last else "nchw",
                                   mode="compile" if compiled else "eager", impl="speedup ours / torch.nn",
                                   speedup=rate["ours"] / rate["torch.nn"])


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
    args = harness.parse_args(__doc__, argv, extra=lambda ap: ap.add_argument(
        "--data", default=None, help="image folder for the input-pipeline rows (default: flowers12 when present)"))
    report = harness.Report("train", args, title="AlexNet training throughput (images/second)")
    bench_training(report, args)
    report.write(plot=("batch", "images_per_s", "impl"))
    bench_data(args)


if __name__ == "__main__":
    main()
