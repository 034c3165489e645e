"""Fused LRN + max-pool against the two operators in sequence.

    python benchmarks/bench_fused.py [--out DIR] [--quick] [--threads N] [--model-batch B] [--model-rounds R]
                                     [--no-model]

AlexNet's norm1/pool1 and norm2/pool2 (LRN size 5, alpha 5e-4, beta 0.75,
k 2; max-pool 3x3 stride 2), at the per-column channel counts of the
two-column model (48, 128) and the whole layer's (96, 256). Implementations:
our fused operator, our LRN and max-pool operators in sequence, PyTorch's
F.local_response_norm + F.max_pool2d (and torch.compile of that pair on a
GPU), NCHW and channels_last, forward and forward+backward.

Bytes: `min_bytes` is the least traffic of the computation (fused: forward
reads x, writes y and the uint8 argmax; backward reads dy, argmax and x,
writes dx), `impl_bytes` the least traffic of the implementation as it is
structured (the pair also writes and reads back the LRN output and, in
backward, its gradient). `gbs` is impl_bytes per second and
`frac_copy_bw` is min_bytes per second over the copy bandwidth measured in
the same run. CPU rows always (N=16, float32); CUDA rows when a GPU is
visible (N=128, float32/bfloat16/float16). The implementations of one shape
are timed in interleaved rounds (each once per round; --reps rounds on a
GPU, two fifths of them, at least 5, on the CPU), so that load changes on a
shared machine hit them alike; the fused-over-pair verdict is the median of
the per-round ratios (paired), the load average is noted.

Whole model: one AlexNet training step (forward, cross-entropy, backward,
SGD with momentum; float32, NCHW, 224x224, batch --model-batch) of
AlexNet(fuse_lrn_pool=True) against AlexNet(fuse_lrn_pool=False) (our LRN
and max-pool as separate layers), same weights, in --model-rounds paired
rounds (alternating order) so that load changes on a shared machine hit
both: median and 10th/90th percentile of the steps, the median of the
per-round differences with a sign-test confidence interval, and each
model's LRN+pool layers timed alone in the same rounds (their share of
the step, and the saving the step difference should show). Writes
benchmarks/results/fused_<device>.{csv,md,png}.
"""
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import alexnet_ext  # noqa: E402
from alexnet_ext.functional import local_response_norm, local_response_norm_max_pool2d, max_pool2d  # noqa: E402
from alexnet_ext.models import AlexNet  # noqa: E402

# name -> (C, H, W): per column of the two-column model, and the whole layer.
SHAPES = {
    "norm1/pool1 48x55x55": (48, 55, 55),
    "norm1/pool1 96x55x55": (96, 55, 55),
    "norm2/pool2 128x27x27": (128, 27, 27),
    "norm2/pool2 256x27x27": (256, 27, 27),
}
# The model's LRN (paper's alpha 1e-4 undivided = 5e-4 in PyTorch's convention).
LRN = dict(size=5, alpha=5e-4, beta=0.75, k=2.0)
POOL = dict(kernel_size=3, stride=2)
TARGET = 1.5  # fused fwd+bwd over our pair, CPU (issue 12)


def fused(x):
    return local_response_norm_max_pool2d(x, **LRN, **POOL)


def our_pair(x):
    return max_pool2d(local_response_norm(x, **LRN), **POOL)


def torch_pair(x):
    return F.max_pool2d(F.local_response_norm(x, **LRN), **POOL)


def implementations(device):
    """name -> (forward(x), layout, structured as the pair?). Names starting
    with "ours" get speedup rows against every other one."""
    impls = {}
    for layout in ("nchw", "channels_last"):
        impls[f"ours fused {layout}"] = (fused, layout, False)
        impls[f"our pair {layout}"] = (our_pair, layout, True)
        impls[f"torch pair {layout}"] = (torch_pair, layout, True)
    if device == "cuda":
        impls["torch.compile pair nchw"] = (torch.compile(torch_pair, dynamic=False), "nchw", True)
    return impls


def traffic(numel, out_numel, elem):
    """Least bytes moved: {(structure, mode): bytes} for the fused operator and the pair."""
    fused_fwd = numel * elem + out_numel * (elem + 1)
    fused_bwd = out_numel * (elem + 1) + 2 * numel * elem
    pair_fwd = fused_fwd + 2 * numel * elem  # LRN output written, read back by the pool
    pair_bwd = fused_bwd + 2 * numel * elem  # its gradient written, read back by the LRN backward
    return {(False, "fwd"): fused_fwd, (False, "fwd+bwd"): fused_fwd + fused_bwd,
            (True, "fwd"): pair_fwd, (True, "fwd+bwd"): pair_fwd + pair_bwd}


def interleaved_ms(fns, device, n_sets, warmup, rounds):
    """{key: (median, (p10, p90)) ms} of fns[key](i): after `warmup` calls of
    each, `rounds` rounds that time every function once in turn, in an
    order that reverses from round to round (harness
    timer, inputs rotated among n_sets), so a change of load on a shared
    machine hits all of them alike rather than whichever ran then. Also
    returns the samples themselves, in round order (for paired ratios)."""
    for fn in fns.values():
        harness.time_ms(fn, device, n_sets, warmup, 1)
    samples = {key: [] for key in fns}
    for r in range(rounds):
        # The order reverses every round: no function always runs right
        # after the same one (e.g. after PyTorch's pair, whose large
        # temporaries leave the allocator to fault fresh pages in for
        # whoever allocates next).
        for key, fn in (list(fns.items()) if r % 2 == 0 else list(fns.items())[::-1]):
            samples[key].append(harness.time_ms(lambda i, fn=fn: fn((r + i) % n_sets), device, 1, 0, 1)[0])
    stats = {}
    for key, ms in samples.items():
        ms = sorted(ms)
        q = lambda f: ms[min(len(ms) - 1, int(f * len(ms)))]  # noqa: E731  (harness.time_ms's percentiles)
        stats[key] = (statistics.median(ms), (q(0.1), q(0.9)))
    return stats, samples


def model_step_fn(fuse, batch, device, state):
    """One SGD training step of AlexNet(fuse_lrn_pool=fuse), built on `device`
    from the weights in `state`; fn(i) alternates between two batches. Also
    returns the model and its first batch (for layer_step_fn)."""
    model = AlexNet(1000, init="default", fuse_lrn_pool=fuse)
    model.load_state_dict(state)
    model = model.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    xs = [(torch.randn(batch, 3, 224, 224, generator=gen) * 60).to(device) for _ in range(2)]
    ys = [torch.randint(0, 1000, (batch,), generator=gen).to(device) for _ in range(2)]

    def step(i):
        loss = F.cross_entropy(model(xs[i % 2]), ys[i % 2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step, model, xs[0]


def layer_step_fn(model, x, device):
    """Forward+backward of the model's own LRN+pool layers (norm1/pool1 and
    norm2/pool2 of every column: the fused module, or LRN then max-pool) at
    the shapes they see in a step of input x, with fresh inputs and
    gradients: fn(i) runs all of them once."""
    shapes = {}

    def record(name):
        def hook(module, inputs, output):  # returns None: the output stays
            shapes.setdefault(name, inputs[0].shape)
        return hook
    hooks = [m.register_forward_hook(record(name))
             for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in ("norm1", "norm2")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    modules = dict(model.named_modules())
    layers = []
    for name, shape in shapes.items():
        layer = torch.nn.Sequential(modules[name], modules[name.replace("norm", "pool")])
        inp = (torch.randn(shape, device=device) * 5).requires_grad_()
        grad = torch.randn_like(layer(inp.detach()))
        layers.append((layer, inp, grad))

    def run(i):
        for layer, inp, grad in layers:
            torch.autograd.grad(layer(inp), inp, grad)
    return run, sorted(f"{n}: {tuple(s)}" for n, s in shapes.items())


def sign_test_interval(values, confidence=0.95):
    """Distribution-free confidence interval of the median of `values`
    (sorted order statistics, sign test): (low, high, achieved confidence);
    the whole range when there are too few values."""
    v, n = sorted(values), len(values)
    cdf = lambda k: sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n  # noqa: E731  P(Binomial(n, 1/2) <= k)
    k = 1  # the largest k with P(B <= k - 1) <= (1 - confidence) / 2 (at least 1): interval [v[k - 1], v[n - k]]
    while k + 1 <= n // 2 and cdf(k) <= (1 - confidence) / 2:
        k += 1
    return v[k - 1], v[n - k], 1.0 - 2 * cdf(k - 1)


def bench_model_step(report, args, device):
    """AlexNet training step with and without the fused operator, paired.

    Every round times one step of each model and one forward+backward of
    each model's LRN+pool layers alone (at the shapes a step gives them),
    in an order that alternates from round to round, so that a change of
    load hits both models alike and the per-round difference of the two
    steps is a paired sample. Reported: the median of those differences
    with a sign-test confidence interval (no assumption on the noise's
    distribution), and the share of each step spent in its LRN+pool layers.
    """
    batch = args.model_batch or (128 if device == "cuda" else (2 if args.quick else 8))
    rounds = 3 if args.quick else args.model_rounds
    state = AlexNet(1000, init="default").state_dict()
    fns, layer_shapes = {}, None
    for fuse in (True, False):
        step, model, x = model_step_fn(fuse, batch, device, state)
        layers, layer_shapes = layer_step_fn(model, x, device)
        fns[("step", fuse)], fns[("layers", fuse)] = step, layers
    for fn in fns.values():  # warm-up
        fn(0)
        fn(1)
    samples = {key: [] for key in fns}
    order = list(fns)
    for r in range(rounds):
        for key in (order if r % 2 == 0 else order[::-1]):
            samples[key].append(harness.time_ms(lambda i, fn=fns[key]: fn(r + i), device, 1, 0, 1)[0])
    shape = f"AlexNet 224x224 batch {batch}"
    pct = lambda ms, f: sorted(ms)[min(len(ms) - 1, int(f * len(ms)))]  # noqa: E731  (harness.time_ms's percentiles)
    med = {key: statistics.median(ms) for key, ms in samples.items()}
    share = {fuse: statistics.median([lay / st for lay, st in zip(samples[("layers", fuse)], samples[("step", fuse)])])
             for fuse in (True, False)}  # of each round's step, its LRN+pool layers' time
    for fuse in (True, False):
        ms = samples[("step", fuse)]
        # Own columns (not `ms`): seconds-long steps would flatten the operator rows' plot.
        report.add(shape=shape, dtype="float32", mode="train step", impl=f"AlexNet fuse_lrn_pool={fuse}",
                   step_ms=med[("step", fuse)], step_ms_p10=pct(ms, 0.1), step_ms_p90=pct(ms, 0.9),
                   lrn_pool_ms=med[("layers", fuse)], lrn_pool_share=share[fuse])
    diffs = [p - f for p, f in zip(samples[("step", False)], samples[("step", True)])]
    layer_diffs = [p - f for p, f in zip(samples[("layers", False)], samples[("layers", True)])]
    lo, hi, conf = sign_test_interval(diffs)
    d_med = statistics.median(diffs)
    fused_ms, pair_ms = med[("step", True)], med[("step", False)]
    report.add(shape=shape, dtype="float32", mode="train step", impl="speedup fused model vs pair model",
               speedup=pair_ms / fused_ms, step_diff_ms=d_med, step_diff_lo=lo, step_diff_hi=hi,
               lrn_pool_diff_ms=statistics.median(layer_diffs))
    verdict = ("too few rounds for a 95% interval" if conf < 0.95 else "faster" if lo > 0 else "slower" if hi < 0
               else "not distinguishable from the pair model")
    report.note(
        f"Whole AlexNet training step (forward, loss, backward, SGD; float32 NCHW, batch {batch}, threads "
        f"{torch.get_num_threads()}, {rounds} paired rounds in alternating order): fuse_lrn_pool=True "
        f"{fused_ms:.1f} ms, False {pair_ms:.1f} ms (medians, {pair_ms / fused_ms:.3f}x). Per-round difference "
        f"(pair - fused): median {d_med:+.1f} ms, {100 * conf:.0f}% sign-test interval [{lo:+.1f}, {hi:+.1f}] ms: "
        f"the fused model: {verdict}. Its LRN+pool layers alone (forward+backward at the step's shapes, timed "
        f"in the same rounds: {'; '.join(layer_shapes)}): fused {med[('layers', True)]:.1f} ms "
        f"({100 * share[True]:.1f}% of its step), pair {med[('layers', False)]:.1f} ms ({100 * share[False]:.1f}% "
        f"of its step); median per-round difference {statistics.median(layer_diffs):+.1f} ms, the saving the "
        f"step difference should show.")


def main(argv=None):
    def extra(ap):
        ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
        ap.add_argument("--model-batch", type=int, default=None,
                        help="batch of the whole-model step rows (default: 8 on the CPU, 128 on a GPU)")
        ap.add_argument("--model-rounds", type=int, default=31, help="paired rounds (one step of each model)")
        ap.add_argument("--no-model", action="store_true", help="skip the whole-model step rows")
    args = harness.parse_args(__doc__, argv, extra=extra)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    report = harness.Report("fused", args, title="Fused LRN + max-pool 3x3/2 against the two operators")
    load_at_start = os.getloadavg()  # a shared machine's other work slows every row, the model step most
    if device != "cuda":
        report.note("No GPU visible: CPU rows only; every CUDA row was skipped (GPU numbers unmeasured).")
    copy_gbs = harness.copy_bandwidth_gbs(device)
    report.note(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (bytes read + written)")
    n = 128 if device == "cuda" else (4 if args.quick else 16)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32]
    reps = args.reps if device == "cuda" else max(5, args.reps * 2 // 5)
    verdicts = []
    for shape_name, (c, h, w) in SHAPES.items():
        oh, ow = (h - 3) // 2 + 1, (w - 3) // 2 + 1
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            numel, out_numel = n * c * h * w, n * c * oh * ow
            elem = torch.finfo(dtype).bits // 8
            bytes_of = traffic(numel, out_numel, elem)
            n_sets = harness.rotation(2 * numel * elem, device)
            fns, structure = {}, {}
            for name, (fwd, layout, is_pair) in implementations(device).items():
                sets = harness.make_sets(n_sets, (n, c, h, w), (n, c, oh, ow), dtype, device, layout)
                fb = harness.fwd_bwd(fwd)
                fns[(name, "fwd")] = lambda i, fwd=fwd, sets=sets: fwd(sets[i][0].detach())
                fns[(name, "fwd+bwd")] = lambda i, fb=fb, sets=sets: fb(*sets[i])
                structure[name] = is_pair
            times = {}
            stats, samples = interleaved_ms(fns, device, n_sets, args.warmup, reps)
            for (name, mode), (ms, (p10, p90)) in stats.items():
                times[(name, mode)] = ms
                is_pair, seconds = structure[name], ms * 1e-3
                report.add(shape=shape_name, dtype=dname, mode=mode, impl=name, ms=ms, ms_p10=p10, ms_p90=p90,
                           impl_bytes=bytes_of[(is_pair, mode)], min_bytes=bytes_of[(False, mode)],
                           gbs=bytes_of[(is_pair, mode)] / seconds / 1e9,
                           frac_copy_bw=bytes_of[(False, mode)] / seconds / 1e9 / copy_gbs)
            harness.add_speedups(report, times, shape=shape_name, dtype=dname)
            for layout in ("nchw", "channels_last"):
                for mode in ("fwd", "fwd+bwd"):
                    s = times[(f"our pair {layout}", mode)] / times[(f"ours fused {layout}", mode)]
                    # Each round's pair time over the same round's fused time: load that changes between
                    # rounds cancels out.
                    paired = statistics.median(
                        p / f for p, f in zip(samples[(f"our pair {layout}", mode)], samples[(f"ours fused {layout}", mode)]))
                    report.add(shape=shape_name, dtype=dname, mode=mode,
                               impl=f"paired speedup {layout} vs our pair {layout}", speedup=paired)
                    check = f" ({'meets' if paired >= TARGET else 'BELOW'} {TARGET}x)" if mode == "fwd+bwd" else ""
                    verdicts.append(f"{shape_name} {dname} {layout} {mode}: {paired:.2f}x{check} (medians {s:.2f}x)")
    report.note(f"Fused speedup over our two operators in sequence, same layout (N={n}, threads "
                f"{torch.get_num_threads()}, {reps} interleaved rounds; median of the per-round ratios, then the "
                "ratio of the medians): " + "; ".join(verdicts))
    if not args.no_model:
        bench_model_step(report, args, device)
    report.note("Load average (1, 5, 15 min) at the start: " + ", ".join(f"{v:.2f}" for v in load_at_start)
                + "; at the end: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
                + f" (on {os.cpu_count()} CPUs; above 0.5 other work shared the cores).")
    report.write(plot=("shape", "frac_copy_bw", "impl") if device == "cuda" else ("shape", "ms", "impl"))


if __name__ == "__main__":
    main()
