"""The one benchmark harness every alexnet_ext benchmark uses.

- CUDA timing with events after warm-up, median of many runs, inputs rotated
  among enough buffers to exceed the L2 cache; CPU timing with perf_counter.
- The device-to-device copy bandwidth measured in the same run, so every
  memory-bound kernel is reported as a fraction of it.
- Results as CSV + Markdown (with GPU, torch and CUDA versions in the header)
  and a matplotlib PNG, under --out (default benchmarks/results/).
"""
import argparse
import csv
import datetime
import os
import platform
import statistics
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(description, argv=None, extra=None):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--out", default=RESULTS_DIR, help="folder for CSV, Markdown and PNG (default: %(default)s)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="cuda when a GPU is visible (CPU rows are measured too), else cpu")
    ap.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
    ap.add_argument("--reps", type=int, default=50, help="timed runs; the median is reported")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller CPU shapes (smoke test)")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup, args.reps = 2, 5
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def environment(device):
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device == "cuda":
        prop = torch.cuda.get_device_properties(0)
        env["gpu"] = prop.name
        env["sms"] = prop.multi_processor_count
        env["l2_mb"] = round(getattr(prop, "L2_cache_size", 0) / 2**20, 1)
        env["cudnn"] = torch.backends.cudnn.version()
    else:
        env["gpu"] = "none"
    return env


def _l2_bytes(device):
    if device == "cuda":
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    return 64 << 20  # generous for a CPU's last-level cache


def rotation(bytes_per_set, device, minimum=2):
    """How many input sets to rotate among so that one round touches more
    memory than the last-level cache holds (at least 3x)."""
    return max(minimum, int(3 * _l2_bytes(device) // max(1, bytes_per_set)) + 1)


def time_ms(fn, device, n_sets=1, warmup=10, reps=50):
    """Median and (10th, 90th) percentile milliseconds of fn(i), where i
    cycles over range(n_sets) so the caller can rotate inputs."""
    for i in range(warmup):
        fn(i % n_sets)
    samples = []
    if device == "cuda":
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            starts[i].record()
            fn(i % n_sets)
            ends[i].record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i % n_sets)
            samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]
    return statistics.median(samples), (q(0.1), q(0.9))


def copy_bandwidth_gbs(device, nbytes=None, warmup=5, reps=20):
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus
    bytes written: the practical ceiling for a memory-bound kernel."""
    if nbytes is None:
        nbytes = 1 << 30 if device == "cuda" else 256 << 20
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda i: dst.copy_(src), device, warmup=warmup, reps=reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


class Report:
    """Collects result rows, prints them and writes CSV, Markdown and PNG."""

    def __init__(self, name, args, title=None):
        self.name, self.args = name, args
        self.title = title or name
        self.env = environment(args.device)
        self.rows = []
        self.notes = []

    def add(self, **row):
        self.rows.append(row)
        print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)

    def note(self, text):
        self.notes.append(text)
        print(text, flush=True)

    def _columns(self):
        cols = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        return cols

    def markdown(self):
        cols = self._columns()
        head = [f"# {self.title}", "",
                "| " + " | ".join(f"{k}: {v}" for k, v in self.env.items()) + " |", "", *self.notes, ""]
        table = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        table += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in self.rows]
        return "\n".join(head + table) + "\n"

    def write(self, plot=None):
        """Writes <out>/<name>_<device>.{csv,md,png}; `plot` = (x, y, hue)
        column names for a grouped bar chart (skipped without matplotlib)."""
        os.makedirs(self.args.out, exist_ok=True)
        stem = os.path.join(self.args.out, f"{self.name}_{self.args.device}")
        cols = self._columns()
        with open(stem + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(self.rows)
        md = self.markdown()
        with open(stem + ".md", "w") as f:
            f.write(md)
        print("\n" + md)
        if plot is not None and self.rows:
            self._plot(stem + ".png", *plot)
        print(f"wrote {stem}.csv, .md" + (", .png" if plot else ""))

    def _plot(self, path, x, y, hue):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plot")
            return
        rows = [r for r in self.rows if isinstance(r.get(y), (int, float))]
        xs = list(dict.fromkeys(str(r[x]) for r in rows))
        hues = list(dict.fromkeys(str(r[hue]) for r in rows))
        width = 0.8 / max(1, len(hues))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(xs) * max(1, len(hues)) * 0.5), 4.5))
        for j, h in enumerate(hues):
            vals = {str(r[x]): r[y] for r in rows if str(r[hue]) == h}
            pos = [i + (j - (len(hues) - 1) / 2) * width for i in range(len(xs))]
            ax.bar(pos, [vals.get(c, 0) for c in xs], width, label=h)
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels(xs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(y)
        ax.set_title(f"{self.title} ({self.env.get('gpu') if self.args.device == 'cuda' else 'CPU'})")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def make_sets(count, x_shape, dy_shape, dtype, device, layout):
    """`count` fresh (x requiring grad, dy) pairs, channels_last when
    `layout` says so: inputs to rotate among (see rotation())."""
    sets = []
    for _ in range(count):
        x = torch.randn(x_shape, device=device, dtype=dtype)
        dy = torch.randn(dy_shape, device=device, dtype=dtype)
        if layout == "channels_last":
            x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
        sets.append((x.requires_grad_(), dy))
    return sets


def fwd_bwd(fn):
    """Forward+backward of `fn` as one callable (x, dy) -> dx, for timing."""
    def run(x, dy):
        return torch.autograd.grad(fn(x), x, dy)[0]
    return run


def add_speedups(report, times, **columns):
    """Adds a row "speedup <layout> vs <baseline>" for every "ours <layout>"
    implementation against every other one timed in the same mode;
    `times[(impl, mode)]` is milliseconds, `columns` lead each row."""
    for (name, mode), ms in times.items():
        if not name.startswith("ours"):
            continue
        layout = name.split()[-1]
        for (base, base_mode), base_ms in times.items():
            if base_mode == mode and not base.startswith("ours"):
                report.add(**columns, mode=mode, impl=f"speedup {layout} vs {base}", speedup=base_ms / ms)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def print_sass_model(op):
    """Prints the static SASS model of the op's CUDA kernels
    (tools/sass_model.py): no GPU needed; it says so and returns when
    nvcc/cuobjdump are missing, and never fails a benchmark run."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    try:
        import sass_model
        sass_model.main(["--op", op])
    except Exception as err:
        print(f"sass_model: skipped ({type(err).__name__}: {err})")
