"""Train AlexNet the way the 2012 paper did.

    python -m alexnet_ext.train                       # built-in synthetic data, CPU ok
    python -m alexnet_ext.train --data ~/imagenet     # ROOT/train/<class>/*.jpg, ROOT/val/<class>/*.jpg
    torchrun --standalone --nproc_per_node 4 -m alexnet_ext.train --data ~/imagenet

Run `python -m alexnet_ext.train --help` for every option.
"""
import argparse
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

import numpy as np
import torch
import torch.nn.functional as F

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

interrupting: Ctrl-C or SIGTERM finishes the current step, writes last.pt and exits with status
130 (SIGINT) or 143 (SIGTERM); a second Ctrl-C aborts at once. Continue with --resume PATH or
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
# The run
# ---------------------------------------------------------------------------

def run(args, model_fn=None):
    """Trains as `args` says; returns the process exit status. `model_fn(args,
    num_classes)` replaces AlexNet (tests use it for tiny models)."""
    info, devices = resolve_devices(args)
    main_proc = info.rank == 0
    say = (lambda *a: print(*a, flush=True)) if main_proc else (lambda *a: None)
    device = devices[0]

    # --- where to write and what to resume -------------------------------
    resume_path = None
    if args.resume == "auto":
        resume_path = ckpt.find_resume_checkpoint(args.out)
        say(f"--resume auto: {'continuing from ' + resume_path if resume_path else 'no checkpoint found, starting fresh'}")
    elif args.resume:
        resume_path = args.resume
    out_dir = args.out or (os.path.dirname(os.path.abspath(resume_path)) if resume_path else default_out_dir())
    state = ckpt.load_checkpoint(resume_path) if resume_path else None

    # --- seeds, data, model ------------------------------------------------
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    train_set, val_set, classes = build_datasets(args)
    args.num_classes = len(classes)
    config = {k: v for k, v in vars(args).items()}
    if state is not None:
        old = state.get("config", {})
        diff = [k for k in ARCH_KEYS if k in old and old[k] != config[k]]
        if diff:
            raise ValueError("--resume: the checkpoint was trained with a different network or data: "
                             + ", ".join(f"{k}={old[k]!r} (now {config[k]!r})" for k in diff)
                             + "; pass the same options as the original run")

    net = (model_fn or build_alexnet)(args, args.num_classes)
    if state is not None:
        net.load_state_dict(state["model"])
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if hasattr(net, "num_columns"):
        from .parallel import place
        model = place(net, devices)
    else:
        model = net.to(device)
    from .distributed import wrap_ddp
    model = wrap_ddp(model)
    if args.compile:
        model = torch.compile(model)

    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    # At most lr_drops reductions: the floor is reached after exactly that many.
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=args.lr_factor, patience=args.lr_patience,
        min_lr=args.lr * args.lr_factor ** args.lr_drops * (1 - 1e-6))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    # --- loaders -----------------------------------------------------------
    sampler = D.ResumableSampler(train_set, num_replicas=info.world_size, rank=info.rank, seed=args.seed)
    pin = device.type == "cuda"
    loader_kw = dict(num_workers=args.workers, pin_memory=pin, collate_fn=D.collate_skip_none,
                     worker_init_fn=D.ignore_sigint_in_worker if args.workers else None,
                     # Draws the workers' base seed from its own generator, not the global RNG
                     # that dropout uses, so creating a loader does not shift the dropout masks.
                     generator=torch.Generator().manual_seed(args.seed))
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, **loader_kw)
    val_indices = list(range(info.rank, len(val_set), info.world_size))
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, sampler=val_indices, **loader_kw)
    batches_per_epoch = math.ceil(sampler.num_samples / args.batch_size)
    if args.limit_train_batches:
        batches_per_epoch = min(batches_per_epoch, args.limit_train_batches)
    log_every = args.log_every or max(1, batches_per_epoch // 20)

    # --- state -------------------------------------------------------------
    epoch, step_in_epoch, global_step = 0, 0, 0
    progress = dict(loss_sum=0.0, images=0, time_s=0.0)
    metrics, steps, best_err = [], [], None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        progress = dict(state["epoch_progress"])
        metrics, steps, best_err = list(state["metrics"]), list(state["steps"]), state["best_top1_err"]
        ckpt.set_rng_state(state["rng"])
        say(f"resumed from {resume_path}: epoch {epoch + 1}, step {step_in_epoch} of {batches_per_epoch}")
        del state
    if main_proc:
        os.makedirs(out_dir, exist_ok=True)
        ckpt.atomic_write(os.path.join(out_dir, "config.json"),
                          lambda f: f.write(json.dumps(dict(config, classes=classes), indent=2).encode()))
    nparams = sum(p.numel() for p in net.parameters())
    say(f"{type(net).__name__}: {nparams:,} parameters, {args.num_classes} classes, "
        f"{'synthetic data' if args.data is None else args.data} ({len(train_set)} train / {len(val_set)} val "
        f"images), devices {', '.join(map(str, devices))}"
        + (f" x {info.world_size} processes" if info.world_size > 1 else "") + f"; writing to {out_dir}")

    def save(best=False):
        if not main_proc:
            return None
        payload = {
            "format_version": ckpt.FORMAT_VERSION, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "epoch_progress": dict(progress), "metrics": metrics, "steps": steps, "best_top1_err": best_err,
            "rng": ckpt.rng_state(), "config": config, "classes": classes,
        }
        path = ckpt.save_checkpoint(payload, os.path.join(out_dir, ckpt.LAST))
        if best:
            ckpt.link_checkpoint(path, os.path.join(out_dir, ckpt.BEST))
        write_csv(os.path.join(out_dir, "steps.csv"), steps) if steps else None
        return path

    def stop_agreed(flag):
        """Every process stops at the same step (DDP would hang otherwise)."""
        dist = _dist()
        if dist is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    # --- the loop -----------------------------------------------------------
    from tqdm import tqdm
    status = 0
    if args.max_steps is not None and global_step >= args.max_steps:
        say(f"--max-steps {args.max_steps}: already reached (step {global_step}); nothing to do")
        return 0
    with GracefulStop(announce=main_proc) as stopper:
        while epoch < args.epochs:
            sampler.set_position(epoch, step_in_epoch * args.batch_size)
            model.train()
            bar = tqdm(total=batches_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                       disable=not main_proc or args.no_progress, dynamic_ncols=True, leave=True)
            window_loss, window_n = torch.zeros((), dtype=torch.float64, device=device), 0
            stop_reason = None
            t_start = time.perf_counter() - progress["time_s"]
            it = iter(train_loader) if step_in_epoch < batches_per_epoch else iter(())
            for batch in it:
                if batch is not None:
                    x, y = batch
                    x = x.to(device, non_blocking=True)
                    if args.channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with autocast():
                        logits = model(x)
                    loss = F.cross_entropy(logits.float(), y.to(logits.device, non_blocking=True))
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    window_loss += loss.detach().double() * len(y)
                    window_n += len(y)
                    progress["images"] += len(y)
                step_in_epoch += 1
                global_step += 1
                last_in_epoch = step_in_epoch >= batches_per_epoch
                if window_n and (global_step % log_every == 0 or last_in_epoch):
                    mean = window_loss.item() / window_n
                    if not math.isfinite(mean):
                        bar.close()
                        raise FloatingPointError(f"the training loss is {mean} at step {global_step}: lower "
                                                 f"--lr (now {optimizer.param_groups[0]['lr']:g})")
                    progress["loss_sum"] += window_loss.item()
                    lr = optimizer.param_groups[0]["lr"]
                    elapsed = time.perf_counter() - t_start
                    steps.append(dict(step=global_step, epoch=epoch + step_in_epoch / batches_per_epoch,
                                      loss=mean, lr=lr))
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.3g}",
                                    img_s=f"{progress['images'] * info.world_size / max(elapsed, 1e-9):.1f}")
                    window_loss.zero_()
                    window_n = 0
                bar.update(1)
                progress["time_s"] = time.perf_counter() - t_start
                if stop_agreed(stopper.requested):
                    stop_reason = signal.Signals(stopper.signum).name if stopper.signum else "signal on another rank"
                elif args.max_steps is not None and global_step >= args.max_steps:
                    stop_reason = f"--max-steps {args.max_steps}"
                if stop_reason or last_in_epoch:
                    break
                if args.checkpoint_every and global_step % args.checkpoint_every == 0:
                    save()
            bar.close()
            del it
            if window_n:  # the window a stop cut short
                progress["loss_sum"] += window_loss.item()
            if stop_reason:
                path = save()
                say(f"stopped ({stop_reason}) at epoch {epoch + 1}, step {step_in_epoch}/{batches_per_epoch}; "
                    f"checkpoint {path}; continue with --resume {path}")
                if stopper.signum:
                    status = 128 + stopper.signum
                break

            # --- end of epoch: evaluate, schedule, record, checkpoint --------
            val = evaluate(net, val_loader, device, autocast, args.channels_last, args.limit_val_batches)
            images = progress["images"] * info.world_size
            row = dict(epoch=epoch + 1, train_loss=progress["loss_sum"] / max(1, progress["images"]), **val,
                       images_per_s=images / max(progress["time_s"], 1e-9),
                       lr=optimizer.param_groups[0]["lr"], epoch_time_s=progress["time_s"])
            metrics.append(row)
            scheduler.step(val["val_top1_err"])
            is_best = best_err is None or val["val_top1_err"] < best_err
            if is_best:
                best_err = val["val_top1_err"]
            say(f"epoch {epoch + 1}/{args.epochs}: train loss {row['train_loss']:.4f}, val loss "
                f"{row['val_loss']:.4f}, top-1 err {100 * row['val_top1_err']:.2f}%, top-5 err "
                f"{100 * row['val_top5_err']:.2f}%, {row['images_per_s']:.1f} images/s, lr {row['lr']:.3g}")
            epoch, step_in_epoch = epoch + 1, 0
            progress = dict(loss_sum=0.0, images=0, time_s=0.0)
            save(best=is_best)
            if main_proc:
                write_csv(os.path.join(out_dir, "metrics.csv"), metrics)
                if args.plot:
                    write_plot(os.path.join(out_dir, "curves.png"), metrics, steps)
            if stop_agreed(stopper.requested):
                say(f"stopped ({signal.Signals(stopper.signum).name}) after epoch {epoch}; checkpoint "
                    f"{os.path.join(out_dir, ckpt.LAST)}")
                status = 128 + stopper.signum
                break
        else:
            say(f"done: {args.epochs} epochs; metrics in {os.path.join(out_dir, 'metrics.csv')}")
    return status


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
