"""Train AlexNet the way the 2012 paper did.

    python -m alexnet_ext.train                       # built-in synthetic data, CPU ok
    python -m alexnet_ext.train --data ~/imagenet     # ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg
    torchrun --standalone --nproc_per_node 4 -m alexnet_ext.train --data ~/imagenet

Run `python -m alexnet_ext.train --help` for every option.
"""
import argparse
import collections
import csv
import datetime
import io
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt
from . import data as D

# The synthetic set is sized so that `make train` (three epochs of the full
# 224x224 AlexNet) runs in a few minutes on a 2-core CPU, where one training
# step at batch 32 takes about 6 s (measured on a busy 2-core machine). With
# 320 images that is 30 steps, enough with PyTorch's default initialisation to
# bring the loss visibly down (2.29 -> 1.94 train, 2.20 -> 1.73 validation);
# the paper's N(0, 0.01) initialisation, made for 1.2M images and ~450k steps,
# leaves the loss at ln(10) for far longer than such a run.
SYNTHETIC_DEFAULTS = dict(batch_size=32, init="default")
DATA_DEFAULTS = dict(batch_size=128, init="paper")

ARCH_KEYS = ("columns", "activation", "no_lrn", "pool_kernel", "image_size", "num_classes")

EPILOG = """\
examples:
  python -m alexnet_ext.train --epochs 3 --plot           # synthetic data (batch 32, --init default): minutes on a CPU
  python -m alexnet_ext.train --data ../shared/data/flowers12 --epochs 30 --batch-size 32 --init default --plot
  python -m alexnet_ext.train --data ~/imagenet --devices cuda:0,cuda:1 --amp bf16
  python -m alexnet_ext.train --resume auto                 # continue the newest run under runs/
  torchrun --standalone --nproc_per_node 4 -m alexnet_ext.train --data ~/imagenet

ablations (the paper's claims, on your data; compare the val_top1_err columns of metrics.csv):
  --activation tanh     saturating units instead of ReLU (section 3.1)
  --no-lrn              no local response normalisation (section 3.3)
  --pool-kernel 2       non-overlapping 2x2 pooling instead of 3x3 stride 2 (section 3.4)
  --columns 1           one column with every layer whole, instead of the two-GPU split

outputs (in --out): metrics.csv (one row per epoch: train_loss, val_loss, val_top1_err,
val_top5_err, images_per_s, lr), steps.csv (training loss every --log-every steps), curves.png
(--plot), config.json, last.pt (every epoch and every --checkpoint-every steps; the one it
replaced is kept as last.prev.pt) and best.pt (lowest validation top-1 error).

interrupting: Ctrl-C or SIGTERM finishes the current step (under torchrun: the processes stop together
within --stop-check-every steps), writes last.pt and exits with status 130 (SIGINT) or 143 (SIGTERM);
a second Ctrl-C aborts at once. Continue with --resume PATH or
--resume auto: with a fixed --seed and --workers 0 on a CPU the resumed run ends with exactly the
parameters an uninterrupted run would have.
"""


def build_parser():
    ap = argparse.ArgumentParser(
        prog="python -m alexnet_ext.train",
        description="Train AlexNet (Krizhevsky, Sutskever & Hinton, 2012) with alexnet_ext's operators: "
                    "the paper's data augmentation, SGD recipe, learning-rate schedule and evaluation, "
                    "with checkpoints that survive interruption. Without --data it trains on a built-in "
                    "synthetic image set that a CPU learns within minutes.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_argument_group("data")
    g.add_argument("--data", metavar="ROOT",
                   help="ImageNet-style folder: ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg (test/ "
                        "is accepted for val/). Default: the built-in synthetic set")
    g.add_argument("--workers", type=int, default=None,
                   help="data loading worker processes (default: min(8, CPU cores - 1); 0 loads in the "
                        "main process)")
    g.add_argument("--ten-crop", action="store_true",
                   help="evaluate on the four corner and centre crops and their mirrors, averaging the "
                        "softmax (the paper's test-time augmentation); default: the centre crop")
    g.add_argument("--image-size", type=int, default=224,
                   help="crop size the network sees (default 224, the paper's); images are first resized "
                        "and centre-cropped to image-size*256/224. Smaller sizes give a cheaper network "
                        "for quick experiments (at least 63)")
    g.add_argument("--synthetic-classes", type=int, default=10, help="synthetic set: classes (default 10)")
    g.add_argument("--synthetic-train", type=int, default=320,
                   help="synthetic set: training images (default 320)")
    g.add_argument("--synthetic-val", type=int, default=100,
                   help="synthetic set: validation images (default 100)")
    g.add_argument("--synthetic-seed", type=int, default=0,
                   help="synthetic set: the seed the images are generated from (default 0)")

    g = ap.add_argument_group("model (the paper's network; the switches are its ablations)")
    g.add_argument("--columns", type=int, choices=(1, 2), default=2,
                   help="2: the paper's two columns (one per GPU with two devices); 1: one column")
    g.add_argument("--activation", choices=("relu", "tanh"), default="relu", help="default relu")
    g.add_argument("--no-lrn", action="store_true", help="leave out local response normalisation")
    g.add_argument("--pool-kernel", type=int, choices=(3, 2), default=3,
                   help="3: overlapping 3x3 stride-2 pooling (paper); 2: non-overlapping 2x2")
    g.add_argument("--dropout", type=float, default=0.5, help="dropout before fc6 and fc7 (default 0.5)")
    g.add_argument("--init", choices=("paper", "default"), default=None,
                   help="paper: weights N(0, 0.01^2), some biases 1 (default with --data); default: "
                        "PyTorch's initialisation (default on the synthetic set, where the paper's "
                        "initialisation would not move the loss within a short run)")

    g = ap.add_argument_group("recipe (the paper's, all overridable)")
    g.add_argument("--epochs", type=int, default=90, help="default 90")
    g.add_argument("--batch-size", type=int, default=None,
                   help=f"images per step (per process under torchrun); default {DATA_DEFAULTS['batch_size']}, "
                        f"or {SYNTHETIC_DEFAULTS['batch_size']} on the synthetic set (more steps in a short CPU run)")
    g.add_argument("--lr", type=float, default=0.01, help="initial learning rate (default 0.01)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, default=5e-4, help="default 5e-4")
    g.add_argument("--lr-factor", type=float, default=0.1,
                   help="multiply the learning rate by this when validation top-1 error stops improving "
                        "(default 0.1)")
    g.add_argument("--lr-patience", type=int, default=5,
                   help="epochs without improvement before reducing the learning rate (default 5)")
    g.add_argument("--lr-drops", type=int, default=3, help="reduce the learning rate at most this often (default 3)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for initialisation, shuffling, augmentation and dropout (default 0)")

    g = ap.add_argument_group("devices and speed")
    g.add_argument("--devices", default=None,
                   help="e.g. cuda:0,cuda:1 (one column per GPU), cuda:0, or cpu. Default: two GPUs when "
                        "there are two, else one, else the CPU (under torchrun: chosen per LOCAL_RANK)")
    g.add_argument("--amp", choices=("bf16", "fp16", "off"), default="off",
                   help="mixed precision (autocast; fp16 adds loss scaling). Default off (float32)")
    g.add_argument("--channels-last", action="store_true", help="NHWC activations and weights")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="capture forward, backward and the SGD update as one CUDA graph and replay it every "
                        "step (one GPU; drops the last partial batch; not with --compile, --amp fp16 or torchrun)")
    g.add_argument("--stop-check-every", type=int, default=10, metavar="N",
                   help="under torchrun: the processes agree whether a signal asks them to stop every N steps "
                        "and at every epoch end (default 10); one process checks after every step")

    g = ap.add_argument_group("output, checkpoints and short runs")
    g.add_argument("--out", metavar="DIR", default=None,
                   help="folder for metrics, plots and checkpoints (default: a new runs/<date-time>/; "
                        "with --resume PATH, the checkpoint's folder)")
    g.add_argument("--resume", metavar="PATH|auto", default=None,
                   help="continue from a checkpoint; auto: <out>/last.pt, or the newest runs/*/last.pt "
                        "(starts fresh when there is none)")
    g.add_argument("--checkpoint-every", type=int, default=1000,
                   help="also write last.pt every N steps (default 1000; 0: only at the end of epochs)")
    g.add_argument("--plot", action="store_true", help="write curves.png (matplotlib) after every epoch")
    g.add_argument("--log-every", type=int, default=None,
                   help="record the training loss every N steps (default: about 20 points per epoch)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many training steps in all (writes a checkpoint; for smoke tests)")
    g.add_argument("--limit-train-batches", type=int, default=None, help="at most N training batches per epoch")
    g.add_argument("--limit-val-batches", type=int, default=None, help="at most N validation batches per evaluation")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    defaults = SYNTHETIC_DEFAULTS if args.data is None else DATA_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workers is None:
        args.workers = min(8, max(0, (os.cpu_count() or 1) - 1))
    for name in ("epochs", "batch_size", "synthetic_classes", "synthetic_train", "synthetic_val"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cuda_graphs and args.compile:
        ap.error("--cuda-graphs and --compile: choose one (torch.compile's own graphs: "
                 "mode='reduce-overhead')")
    if args.cuda_graphs and args.amp == "fp16":
        ap.error("--cuda-graphs cannot capture --amp fp16: the loss scaler decides on the host whether to "
                 "step; use --amp bf16")
    if args.stop_check_every < 1:
        ap.error(f"--stop-check-every must be >= 1, got {args.stop_check_every}")
    for name in ("workers", "checkpoint_every", "lr_patience", "lr_drops"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("max_steps", "limit_train_batches", "limit_val_batches", "log_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 63:
        ap.error(f"--image-size must be at least 63, got {args.image_size}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    if not 0 < args.lr_factor < 1:
        ap.error(f"--lr-factor must be in (0, 1), got {args.lr_factor}")
    if not 0 <= args.dropout < 1:
        ap.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.resume == "":
        ap.error("--resume needs a checkpoint path or 'auto'")
    return args


# ---------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------

class GracefulStop:
    """SIGINT/SIGTERM set a flag the training loop checks after each step; a
    second signal aborts at once (KeyboardInterrupt)."""

    def __init__(self, announce=True):
        self.signum = None
        self.announce = announce
        self._previous = {}

    def __enter__(self):
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then writing a checkpoint "
                  "(send it again to abort without one)", file=sys.stderr, flush=True)

    @property
    def requested(self):
        return self.signum is not None


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _image_sizes(args):
    return args.image_size, round(args.image_size * D.RESIZE / D.CROP)


def build_datasets(args):
    """(train set, val set, class names) for --data or the synthetic set."""
    crop, resize = _image_sizes(args)
    train_tf = D.TrainTransform(crop=crop)
    val_tf = D.EvalTransform(crop=crop, ten_crop=args.ten_crop)
    if args.data is None:
        common = dict(num_classes=args.synthetic_classes, seed=args.synthetic_seed, size=resize, aug_seed=args.seed)
        train = D.SyntheticShapes(args.synthetic_train, split="train", transform=train_tf, **common)
        val = D.SyntheticShapes(args.synthetic_val, split="val", transform=val_tf, **common)
        return train, val, train.classes
    train = D.ImageFolderDataset(args.data, "train", train_tf, aug_seed=args.seed, size=resize)
    val = D.ImageFolderDataset(args.data, "val", val_tf, classes=train.classes, size=resize)
    return train, val, train.classes


def build_alexnet(args, num_classes):
    from .models import AlexNet
    return AlexNet(num_classes=num_classes, columns=args.columns, dropout=args.dropout, init=args.init,
                   activation=args.activation, lrn=not args.no_lrn, pool_kernel=args.pool_kernel,
                   input_size=args.image_size)


def resolve_devices(args):
    """(distributed info, this process's devices)."""
    from .distributed import setup_distributed
    explicit = None
    if args.devices:
        try:
            explicit = [torch.device(d.strip()) for d in args.devices.split(",") if d.strip()]
        except RuntimeError as err:
            raise ValueError(f"--devices {args.devices!r}: {err}") from None
        if not explicit or len(explicit) > 2:
            raise ValueError(f"--devices must list one or two devices, got {args.devices!r}")
        for d in explicit:
            if d.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"--devices {args.devices}: CUDA is not available on this machine")
            if d.type not in ("cpu", "cuda"):
                raise ValueError(f"--devices {args.devices}: only cpu and cuda devices are supported")
        if len(explicit) == 2 and args.columns == 1:
            raise ValueError("--devices lists two devices but --columns 1 has one column: give one device, "
                             "or use torchrun for data parallelism")
    info = setup_distributed(force_cpu=explicit is not None and explicit[0].type == "cpu")
    return info, explicit or list(info.devices)


def default_out_dir():
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = os.path.join("runs", stamp), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join("runs", f"{stamp}-{n}")
    return path


def write_csv(path, rows):
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    ckpt.atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_plot(path, metrics, steps):
    """Loss (per logged step and per epoch), validation errors and learning rate."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot written", flush=True)
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if steps:
        ax.plot([s["epoch"] for s in steps], [s["loss"] for s in steps], lw=0.8, alpha=0.6, label="train (steps)")
    if metrics:
        ep = [m["epoch"] for m in metrics]
        ax.plot(ep, [m["train_loss"] for m in metrics], "o-", label="train (epoch mean)")
        ax.plot(ep, [m["val_loss"] for m in metrics], "s-", label="validation")
    ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax.legend()
    ax = axes[1]
    if metrics:
        ax.plot(ep, [100 * m["val_top1_err"] for m in metrics], "o-", label="top-1")
        ax.plot(ep, [100 * m["val_top5_err"] for m in metrics], "s-", label="top-5")
        ax.legend()
    ax.set(xlabel="epoch", ylabel="error (%)", title="validation error")
    ax = axes[2]
    if steps:
        ax.plot([s["epoch"] for s in steps], [s["lr"] for s in steps])
        ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="learning rate", title="learning rate")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    ckpt.atomic_write(path, lambda f: f.write(buf.getvalue()))


@torch.no_grad()
def evaluate(net, loader, device, autocast, channels_last, limit=None):
    """Validation loss and top-1/top-5 error. Ten-crop batches (B, 10, C, H, W)
    average the softmax over the crops. Sums are reduced over all processes."""
    was_training = net.training
    net.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 correct, top-5 correct, n
    for i, batch in enumerate(loader):
        if limit is not None and i >= limit:
            break
        if batch is None:
            continue
        x, y = batch
        x = x.to(device, non_blocking=True)
        crops = x.shape[1] if x.dim() == 5 else 0
        if crops:
            x = x.flatten(0, 1)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = net(x).float()
        y = y.to(logits.device)
        if crops:
            logp = logits.softmax(-1).view(-1, crops, logits.shape[-1]).mean(1).clamp_min(1e-30).log()
        else:
            logp = logits.log_softmax(-1)
        top = logp.topk(min(5, logp.shape[-1]), dim=1).indices
        totals += torch.stack([F.nll_loss(logp, y, reduction="sum").double(),
                               (top[:, 0] == y).sum().double(),
                               (top == y[:, None]).any(1).sum().double(),
                               torch.tensor(float(len(y)), dtype=torch.float64, device=logits.device)]).to(device)
    dist = _dist()
    if dist is not None:
        dist.all_reduce(totals)
    net.train(was_training)
    loss, c1, c5, n = totals.tolist()
    if n == 0:
        return dict(val_loss=float("nan"), val_top1_err=float("nan"), val_top5_err=float("nan"))
    return dict(val_loss=loss / n, val_top1_err=1 - c1 / n, val_top5_err=1 - c5 / n)


# ---------------------------------------------------------------------------
# The training state (what a checkpoint holds) and the run's fixed parts
# ---------------------------------------------------------------------------

def fresh_progress():
    """The running totals of an epoch (resumed mid-epoch from a checkpoint).
    `window_loss_sum`/`window_images`: the log window still open when a
    checkpoint was written (its steps are in `images` but not yet in
    `loss_sum`); resume reopens it, so its steps' losses are neither lost nor
    logged early. Checkpoints from before these keys resume with an empty one."""
    return dict(loss_sum=0.0, images=0, time_s=0.0, window_loss_sum=0.0, window_images=0)


@dataclass
class TrainState:
    """Everything a run carries from step to step. A checkpoint is exactly
    these fields (checkpoint.state_payload: components as their state dicts,
    the rest as they are) and resume puts every one of them back
    (checkpoint.restore_state), so a field added here cannot be forgotten.
    `config` and `classes` are written for the reader; a resumed run keeps
    its own (the network options are checked to match, see check_resumable)."""
    model: nn.Module                      # the network itself, not a DDP/compile wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau
    scaler: torch.amp.GradScaler
    config: dict = field(metadata=ckpt.RECORD_ONLY)
    classes: list = field(metadata=ckpt.RECORD_ONLY)
    epoch: int = 0                        # epochs completed
    step_in_epoch: int = 0                # batches of the current epoch done
    global_step: int = 0
    epoch_progress: dict = field(default_factory=fresh_progress)
    metrics: list = field(default_factory=list)   # one row per epoch (metrics.csv)
    steps: list = field(default_factory=list)     # one row per log point (steps.csv)
    best_top1_err: Optional[float] = None
    rng: ckpt.GlobalRNG = field(default_factory=ckpt.GlobalRNG)

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]


@dataclass
class Session:
    """The parts of a run that are rebuilt from the options, never saved."""
    args: argparse.Namespace
    info: object                          # distributed.DistributedInfo
    devices: list
    model: nn.Module                      # what the step calls: maybe ColumnParallel, DDP, compiled
    sampler: D.ResumableSampler
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    batches_per_epoch: int
    log_every: int
    out_dir: str
    stop: "StopVote"
    step: object = None                   # (session, state, batch) -> (loss on the device, images)

    @property
    def device(self):
        return self.devices[0]

    @property
    def main_proc(self):
        return self.info.rank == 0

    def say(self, *a):
        if self.main_proc:
            print(*a, flush=True)

    def autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.args.amp)
        # A captured graph must not reuse weight casts cached outside it (PyTorch's
        # CUDA-graph notes): no autocast cache with --cuda-graphs.
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None,
                              cache_enabled=not self.args.cuda_graphs)


class LossWindow:
    """The training loss summed on the device between two log points.

    add() queues a device addition (no host read). close() ends a window: it
    starts copying the sum to pinned host memory and records an event, without
    waiting; ready() hands back the closed windows whose copies have landed
    (with wait=True all of them). So a step never waits for the device to tell
    the host its loss: a window is read at a later step, or at the end of the
    epoch, when its copy has long finished."""

    def __init__(self, device, carried_sum=0.0, carried_n=0):
        """`carried_sum`/`carried_n`: a window a checkpoint left open."""
        self.device = torch.device(device)
        self.sum = torch.tensor(float(carried_sum), dtype=torch.float64, device=self.device)
        self.n = int(carried_n)
        self._pending = collections.deque()

    def add(self, loss, n):
        self.sum += loss.double() * n
        self.n += n

    def close(self, record):
        """Ends the window; `record` (a steps.csv row without its loss) comes
        back from ready() with the window's sum and image count."""
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                host = torch.empty((), dtype=torch.float64, pin_memory=True)
                host.copy_(self.sum, non_blocking=True)
                landed = torch.cuda.Event()
                landed.record(torch.cuda.current_stream(self.device))
        else:
            host, landed = self.sum.clone(), None
        self._pending.append((host, landed, self.n, record))
        self.sum.zero_()
        self.n = 0

    def ready(self, wait=False):
        """[(loss sum, images, record)] of the closed windows now on the host, oldest first."""
        out = []
        while self._pending:
            host, landed, n, record = self._pending[0]
            if landed is not None and not landed.query():
                if not wait:
                    break
                landed.synchronize()
            self._pending.popleft()
            out.append((host.item(), n, record))
        return out

    def open_window(self):
        """(loss sum, images) of the window still open, read now (a checkpoint
        is written after it, so this host read costs no extra wait)."""
        return (self.sum.item() if self.n else 0.0), self.n


class StopVote:
    """Every process must stop at the same step (DDP would hang otherwise).

    In one process the signal flag is a host variable, read after every step.
    Under torchrun the processes vote every `every` steps and at the end of
    every epoch, and only then: the vote is a CPU tensor all-reduced over a
    gloo group (the default group on the CPU, a second group beside NCCL on
    GPUs), a host-to-host exchange that never waits for a GPU, so no step
    synchronises with the device to learn whether to stop."""

    def __init__(self, every, dist=None):
        self.every = every
        self.dist = dist
        self.group = None
        if dist is not None and dist.get_backend() != "gloo":
            self.group = dist.new_group(backend="gloo")  # every rank creates it, in the same order

    def due(self, global_step, last_in_epoch):
        return self.dist is None or last_in_epoch or global_step % self.every == 0

    def agreed(self, flag):
        if self.dist is None:
            return bool(flag)
        vote = torch.tensor([1.0 if flag else 0.0])
        self.dist.all_reduce(vote, op=self.dist.ReduceOp.MAX, group=self.group)
        return bool(vote.item())


# ---------------------------------------------------------------------------
# Building a run
# ---------------------------------------------------------------------------

def resume_source(args, say):
    """(checkpoint path or None, output folder)."""
    path = None
    if args.resume == "auto":
        path = ckpt.find_resume_checkpoint(args.out)
        say(f"--resume auto: {'continuing from ' + path if path else 'no checkpoint found, starting fresh'}")
    elif args.resume:
        path = args.resume
    out_dir = args.out or (os.path.dirname(os.path.abspath(path)) if path else default_out_dir())
    return path, out_dir


def check_resumable(saved_config, config):
    diff = [k for k in ARCH_KEYS if k in saved_config and saved_config[k] != config[k]]
    if diff:
        raise ValueError("--resume: the checkpoint was trained with a different network or data: "
                         + ", ".join(f"{k}={saved_config[k]!r} (now {config[k]!r})" for k in diff)
                         + "; pass the same options as the original run")


def check_cuda_graphs(args, devices, info):
    """--cuda-graphs needs one CUDA device and a step without host decisions."""
    if not args.cuda_graphs:
        return
    problems = []
    if devices[0].type != "cuda":
        problems.append(f"it needs a CUDA device (this run uses {devices[0]})")
    if len(set(devices)) > 1:
        problems.append("it captures one device: give one GPU (--devices cuda:0; both columns then run on two "
                        "streams of it)")
    if info.world_size > 1:
        problems.append("it does not run under torchrun (DistributedDataParallel's hooks are not captured)")
    if problems:
        raise ValueError("--cuda-graphs: " + "; ".join(problems))


def build_model(args, model_fn, num_classes, devices):
    """(the network, what the step calls: placed, DDP-wrapped, compiled)."""
    net = (model_fn or build_alexnet)(args, num_classes)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if hasattr(net, "num_columns"):
        from .parallel import place
        model = place(net, devices)
    else:
        model = net.to(devices[0])
    from .distributed import wrap_ddp
    model = wrap_ddp(model)
    if args.compile:
        model = torch.compile(model)
    return net, model


def build_optimizer(args, net, device):
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    # At most lr_drops reductions: the floor is reached after exactly that many.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=args.lr_factor, patience=args.lr_patience,
        min_lr=args.lr * args.lr_factor ** args.lr_drops * (1 - 1e-6))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    return optimizer, scheduler, scaler


def build_loaders(args, info, device, train_set, val_set):
    """(sampler, train loader, val loader, batches per epoch)."""
    sampler = D.ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank, seed=args.seed)
    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", collate_fn=D.collate_skip_none,
                     worker_init_fn=D.ignore_sigint_in_worker if args.workers else None,
                     # Draws the workers' base seed from its own generator, not the global RNG
                     # that dropout uses, so creating a loader does not shift the dropout masks.
                     generator=torch.Generator().manual_seed(args.seed))
    # A captured step has static shapes: --cuda-graphs drops the last partial batch.
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler,
                                               drop_last=args.cuda_graphs, **loader_kw)
    val_indices = list(range(info.rank, len(val_set), info.world_size))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, sampler=val_indices, **loader_kw)
    if args.cuda_graphs:
        batches = sampler.num_samples // args.batch_size
        if batches == 0:
            raise ValueError(f"--cuda-graphs drops partial batches, and {sampler.num_samples} training images "
                             f"per process make none of --batch-size {args.batch_size}")
    else:
        batches = math.ceil(sampler.num_samples / args.batch_size)
    if args.limit_train_batches:
        batches = min(batches, args.limit_train_batches)
    return sampler, train_loader, val_loader, batches


def setup(args, model_fn=None):
    """(Session, TrainState) for `args`: devices, data, model, optimizer,
    loaders, and the state restored from --resume."""
    info, devices = resolve_devices(args)
    check_cuda_graphs(args, devices, info)
    say = (lambda *a: print(*a, flush=True)) if info.rank == 0 else (lambda *a: None)
    resume_path, out_dir = resume_source(args, say)
    saved = ckpt.load_checkpoint(resume_path) if resume_path else None

    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    train_set, val_set, classes = build_datasets(args)
    args.num_classes = len(classes)
    config = dict(vars(args))
    if saved is not None:
        check_resumable(saved.get("config", {}), config)
    net, model = build_model(args, model_fn, args.num_classes, devices)
    optimizer, scheduler, scaler = build_optimizer(args, net, devices[0])
    sampler, train_loader, val_loader, batches_per_epoch = build_loaders(args, info, devices[0], train_set, val_set)
    state = TrainState(net, optimizer, scheduler, scaler, config=config, classes=classes)
    if saved is not None:
        ckpt.restore_state(state, saved, resume_path)
        say(f"resumed from {resume_path}: epoch {state.epoch + 1}, step {state.step_in_epoch} of "
            f"{batches_per_epoch}")
        del saved
    session = Session(args, info, devices, model, sampler, train_loader, val_loader, batches_per_epoch,
                      log_every=args.log_every or max(1, batches_per_epoch // 20), out_dir=out_dir,
                      stop=StopVote(args.stop_check_every, _dist()))
    session.step = GraphedTrainStep(session, state) if args.cuda_graphs else train_step
    if session.main_proc:
        os.makedirs(out_dir, exist_ok=True)
        ckpt.atomic_write(os.path.join(out_dir, "config.json"),
                          lambda f: f.write(json.dumps(dict(config, classes=classes), indent=2).encode()))
    say(f"{type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} parameters, {args.num_classes} "
        f"classes, {'synthetic data' if args.data is None else args.data} ({len(train_set)} train / "
        f"{len(val_set)} val images), devices {', '.join(map(str, devices))}"
        + (f" x {info.world_size} processes" if info.world_size > 1 else "") + f"; writing to {out_dir}")
    return session, state


# ---------------------------------------------------------------------------
# The step, the epoch, the end of an epoch
# ---------------------------------------------------------------------------

def train_step(s, state, batch):
    """One SGD step on `batch`; returns (the loss, still on the device; images).
    Nothing in it reads a device value on the host (fp16's GradScaler aside:
    PyTorch's scaler.step reads its inf check)."""
    x, y = batch
    x = x.to(s.device, non_blocking=True)
    if s.args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with s.autocast():
        logits = s.model(x)
    loss = F.cross_entropy(logits.float(), y.to(logits.device, non_blocking=True))
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss.detach(), len(y)


class GraphedTrainStep:
    """--cuda-graphs: forward, loss, backward and the SGD update captured as
    one CUDA graph and replayed for every batch, the way PyTorch documents
    whole-network capture (torch.cuda.graphs): warm-up iterations on a side
    stream, static input and target buffers the batches are copied into, the
    gradients set to None before capture so that backward allocates them in
    the graph's private pool. The first WARMUP steps are ordinary training
    steps run on the side stream; the graph is captured at the next one and
    captured again after the scheduler changes the learning rate (the update
    bakes the rate in as a kernel argument)."""

    WARMUP = 3

    def __init__(self, s, state):
        self.s, self.state = s, state
        self.warm = 0
        self.graph = None
        self.lr = None
        self.static = None  # (x, y, loss)

    def __call__(self, s, state, batch):
        x, y = batch
        if self.graph is None or self.lr != state.lr:
            if self.warm < self.WARMUP:
                self.warm += 1
                side = torch.cuda.Stream(s.device)
                side.wait_stream(torch.cuda.current_stream(s.device))
                with torch.cuda.stream(side):
                    loss, n = train_step(s, state, batch)
                current = torch.cuda.current_stream(s.device)
                current.wait_stream(side)
                loss.record_stream(current)  # summed on the current stream after the side stream made it
                return loss, n
            self._capture(x, y)
        static_x, static_y, static_loss = self.static
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        return static_loss, len(y)

    def _capture(self, x, y):
        s, state = self.s, self.state
        fmt = torch.channels_last if s.args.channels_last else torch.contiguous_format
        static_x = torch.empty_like(x, device=s.device, memory_format=fmt)
        static_y = torch.empty_like(y, device=s.device)
        state.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            with s.autocast():
                logits = s.model(static_x)
            static_loss = F.cross_entropy(logits.float(), static_y)
            static_loss.backward()
            state.optimizer.step()
        self.static = (static_x, static_y, static_loss.detach())
        self.lr = state.lr


def train_epoch(s, state, stopper):
    """Trains from the state's position to the end of its epoch, or to a stop;
    returns the stop's reason (None at the end of the epoch)."""
    from tqdm import tqdm
    s.sampler.set_position(state.epoch, state.step_in_epoch * s.args.batch_size)
    s.model.train()
    bar = tqdm(total=s.batches_per_epoch, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{s.args.epochs}",
               disable=not s.main_proc or s.args.no_progress, dynamic_ncols=True, leave=True)
    progress = state.epoch_progress
    window = LossWindow(s.device, progress.get("window_loss_sum", 0.0), progress.get("window_images", 0))
    clock = time.perf_counter() - state.epoch_progress["time_s"]  # the epoch's start, as if never interrupted
    stop_reason = None
    batches = iter(s.train_loader) if state.step_in_epoch < s.batches_per_epoch else iter(())
    try:
        for batch in batches:
            if batch is not None:
                loss, n = s.step(s, state, batch)
                window.add(loss, n)
                state.epoch_progress["images"] += n
            state.step_in_epoch += 1
            state.global_step += 1
            stop_reason = after_step(s, state, stopper, window, bar, clock)
            if stop_reason or state.step_in_epoch >= s.batches_per_epoch:
                break
        record_windows(s, state, window.ready(wait=True), bar, clock)
        carry_open_window(state, window)  # a stop may cut a window short
    finally:
        bar.close()
        del batches
    return stop_reason


def after_step(s, state, stopper, window, bar, clock):
    """A step's bookkeeping: log windows, progress, the stop decision, periodic
    checkpoints. Reads nothing from the device except at a checkpoint."""
    last_in_epoch = state.step_in_epoch >= s.batches_per_epoch
    if window.n and (state.global_step % s.log_every == 0 or last_in_epoch):
        window.close(dict(step=state.global_step, epoch=state.epoch + state.step_in_epoch / s.batches_per_epoch,
                          lr=state.lr))
    record_windows(s, state, window.ready(), bar, clock)
    bar.update(1)
    state.epoch_progress["time_s"] = time.perf_counter() - clock
    if s.stop.due(state.global_step, last_in_epoch) and s.stop.agreed(stopper.requested):
        return signal.Signals(stopper.signum).name if stopper.signum else "signal on another rank"
    if s.args.max_steps is not None and state.global_step >= s.args.max_steps:
        return f"--max-steps {s.args.max_steps}"
    if not last_in_epoch and s.args.checkpoint_every and state.global_step % s.args.checkpoint_every == 0:
        record_windows(s, state, window.ready(wait=True), bar, clock)
        carry_open_window(state, window)
        save(s, state)
    return None


def carry_open_window(state, window):
    """Puts the open log window into the epoch's progress, which the next
    checkpoint saves (see fresh_progress)."""
    state.epoch_progress["window_loss_sum"], state.epoch_progress["window_images"] = window.open_window()


def record_windows(s, state, windows, bar, clock):
    """Appends closed log windows to steps.csv's rows and the epoch's loss sum."""
    for loss_sum, n, record in windows:
        mean = loss_sum / n
        if not math.isfinite(mean):
            raise FloatingPointError(f"the training loss is {mean} at step {record['step']}: lower "
                                     f"--lr (now {record['lr']:g})")
        state.epoch_progress["loss_sum"] += loss_sum
        state.steps.append(dict(step=record["step"], epoch=record["epoch"], loss=mean, lr=record["lr"]))
        rate = state.epoch_progress["images"] * s.info.world_size / max(time.perf_counter() - clock, 1e-9)
        bar.set_postfix(loss=f"{mean:.4f}", lr=f"{record['lr']:.3g}", img_s=f"{rate:.1f}")


def end_of_epoch(s, state):
    """Evaluate, schedule the learning rate, record, checkpoint, plot."""
    args, progress = s.args, state.epoch_progress
    val = evaluate(state.model, s.val_loader, s.device, s.autocast, args.channels_last, args.limit_val_batches)
    row = dict(epoch=state.epoch + 1, train_loss=progress["loss_sum"] / max(1, progress["images"]), **val,
               images_per_s=progress["images"] * s.info.world_size / max(progress["time_s"], 1e-9),
               lr=state.lr, epoch_time_s=progress["time_s"])
    state.metrics.append(row)
    state.scheduler.step(val["val_top1_err"])
    is_best = state.best_top1_err is None or val["val_top1_err"] < state.best_top1_err
    if is_best:
        state.best_top1_err = val["val_top1_err"]
    s.say(f"epoch {state.epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, val loss "
          f"{row['val_loss']:.4f}, top-1 err {100 * row['val_top1_err']:.2f}%, top-5 err "
          f"{100 * row['val_top5_err']:.2f}%, {row['images_per_s']:.1f} images/s, lr {row['lr']:.3g}")
    state.epoch, state.step_in_epoch, state.epoch_progress = state.epoch + 1, 0, fresh_progress()
    save(s, state, best=is_best)
    if s.main_proc:
        write_csv(os.path.join(s.out_dir, "metrics.csv"), state.metrics)
        if args.plot:
            write_plot(os.path.join(s.out_dir, "curves.png"), state.metrics, state.steps)


def save(s, state, best=False):
    """last.pt (and best.pt) from rank 0; returns the path."""
    if not s.main_proc:
        return None
    path = ckpt.save_checkpoint(ckpt.state_payload(state), os.path.join(s.out_dir, ckpt.LAST))
    if best:
        ckpt.link_checkpoint(path, os.path.join(s.out_dir, ckpt.BEST))
    if state.steps:
        write_csv(os.path.join(s.out_dir, "steps.csv"), state.steps)
    return path


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

def run(args, model_fn=None):
    """Trains as `args` says; returns the process exit status. `model_fn(args,
    num_classes)` replaces AlexNet (tests use it for tiny models)."""
    s, state = setup(args, model_fn)
    if args.max_steps is not None and state.global_step >= args.max_steps:
        s.say(f"--max-steps {args.max_steps}: already reached (step {state.global_step}); nothing to do")
        return 0
    with GracefulStop(announce=s.main_proc) as stopper:
        while state.epoch < args.epochs:
            reason = train_epoch(s, state, stopper)
            if reason:
                path = save(s, state)
                s.say(f"stopped ({reason}) at epoch {state.epoch + 1}, step {state.step_in_epoch}/"
                      f"{s.batches_per_epoch}; checkpoint {path}; continue with --resume {path}")
                return 128 + stopper.signum if stopper.signum else 0
            end_of_epoch(s, state)
            if s.stop.agreed(stopper.requested):
                s.say(f"stopped ({signal.Signals(stopper.signum).name if stopper.signum else 'signal on another rank'})"
                      f" after epoch {state.epoch}; checkpoint {os.path.join(s.out_dir, ckpt.LAST)}")
                return 128 + stopper.signum if stopper.signum else 0
    s.say(f"done: {args.epochs} epochs; metrics in {os.path.join(s.out_dir, 'metrics.csv')}")
    return 0


def main(argv=None, model_fn=None):
    """The command line: parse `argv`, train (see run()), turn the errors a
    user can fix into a message and exit status 2, and leave the process
    group cleanly. `model_fn` as in run()."""
    args = parse_args(argv)
    from .distributed import cleanup
    finished = False  # every rank returned from run(): they can meet at a barrier
    try:
        status = run(args, model_fn=model_fn)
        finished = True
        return status
    except (ckpt.CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("aborted without a checkpoint (second interrupt)", file=sys.stderr, flush=True)
        return 130
    finally:
        cleanup(synchronize=finished)


if __name__ == "__main__":
    sys.exit(main())
