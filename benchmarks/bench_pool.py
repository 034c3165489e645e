"""Max-pool: alexnet_ext against PyTorch eager and torch.compile (and cuDNN
pooling where a binding is available).

    python benchmarks/bench_pool.py [--out DIR] [--quick]

AlexNet's pooling shapes (3x3 window, stride 2), forward (inference, under
no_grad: no argmax written) and forward+backward. On a GPU: N=128,
float32/bfloat16/float16, NCHW and channels_last. On the CPU: N=16, float32.
Reported per row: median time, GB/s on the minimal bytes and its fraction of
the copy bandwidth measured in the same run, our speedup over each baseline,
and the bytes each implementation keeps for backward per output element.

Minimal bytes (E = element size): forward reads x and writes y,
(in + out) * E; forward+backward also writes and reads back a one-byte
argmax and reads dy and writes dx: 2 * (in + out) * E + 2 * out.
Writes benchmarks/results/pool_<device>.{csv,md,png}.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import alexnet_ext  # noqa: E402

SHAPES = {"pool1 96x55x55": (96, 55, 55), "pool2 256x27x27": (256, 27, 27), "pool5 256x13x13": (256, 13, 13)}
WINDOW = dict(kernel_size=3, stride=2)
# The CPU target of the issue: ours at least this much faster than F.max_pool2d.
CPU_TARGET = 1.5


def ours(x):
    return alexnet_ext.functional.max_pool2d(x, **WINDOW)


def eager(x):
    return F.max_pool2d(x, **WINDOW)


def inference(fn):
    def run(x, _dy):
        with torch.no_grad():
            return fn(x)
    return run


def implementations(device, cudnn):
    """name -> (forward, forward+backward, layout) for the baselines the machine has."""
    impls = {}
    for layout in ("nchw", "channels_last"):
        impls[f"ours {layout}"] = (inference(ours), harness.fwd_bwd(ours), layout)
        impls[f"torch eager {layout}"] = (inference(eager), harness.fwd_bwd(eager), layout)
    if device == "cuda":
        for layout in ("nchw", "channels_last"):
            compiled = torch.compile(eager, dynamic=False)
            impls[f"torch.compile {layout}"] = (inference(compiled), harness.fwd_bwd(compiled), layout)
        if cudnn is not None:
            def cudnn_fwd(x, _dy):
                return cudnn.forward(x, 3, 2)

            def cudnn_fb(x, dy):
                y = cudnn.forward(x, 3, 2)
                return cudnn.backward(y, dy, x, 3, 2)
            for layout in ("nchw", "channels_last"):
                impls[f"cudnn {layout}"] = (cudnn_fwd, cudnn_fb, layout)
    return impls


def saved_bytes_per_output(fn, x):
    """Bytes autograd keeps for backward per output element, not counting
    tensors that share the input's storage (those are alive anyway)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    own = [t for t in saved if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()]
    return sum(t.numel() * t.element_size() for t in own) / y.numel()


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    device = args.device
    report = harness.Report("pool", args, title="Overlapping max-pool (3x3, stride 2)")
    cudnn, why = None, "no GPU"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        from baselines import load_cudnn_pool
        cudnn, why = load_cudnn_pool()
        if cudnn is None:
            report.note(f"cuDNN rows skipped: {why}")
    else:
        report.note("No GPU visible: CPU rows only; every CUDA row (ours, eager, torch.compile, cuDNN) was skipped.")
    copy_gbs = harness.copy_bandwidth_gbs(device)
    report.note(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (bytes read + written)")
    n = 128 if device == "cuda" else (4 if args.quick else 16)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32]
    reps = args.reps if device == "cuda" else max(5, args.reps // 5)
    cpu_verdicts = []
    for shape_name, shape in SHAPES.items():
        for dtype in dtypes:
            elem = torch.finfo(dtype).bits // 8
            numel_in = n * shape[0] * shape[1] * shape[2]
            out_shape = (n, shape[0], (shape[1] - 3) // 2 + 1, (shape[2] - 3) // 2 + 1)
            numel_out = out_shape[0] * out_shape[1] * out_shape[2] * out_shape[3]
            modes = (("fwd", (numel_in + numel_out) * elem, 0),
                     ("fwd+bwd", 2 * (numel_in + numel_out) * elem + 2 * numel_out, 1))
            times = {}
            for name, fns in implementations(device, cudnn).items():
                layout = fns[2]
                sets = harness.make_sets(harness.rotation(3 * numel_in * elem, device), (n, *shape), out_shape,
                                         dtype, device, layout)
                saved = ""
                if not name.startswith(("cudnn", "torch.compile")):
                    saved = saved_bytes_per_output(ours if name.startswith("ours") else eager, sets[0][0])
                for mode, nbytes, which in modes:
                    fn = fns[which]
                    try:
                        ms, (p10, p90) = harness.time_ms(lambda i: fn(*sets[i]), device, len(sets), args.warmup, reps)
                    except Exception as err:  # a baseline that fails is reported, not fatal
                        report.note(f"{name} {mode} {shape_name} {dtype}: skipped ({type(err).__name__}: {err})"[:300])
                        continue
                    times[(name, mode)] = ms
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    report.add(shape=shape_name, dtype=str(dtype).replace("torch.", ""), mode=mode, impl=name,
                               case=f"{shape_name.split()[0]} {str(dtype).replace('torch.', '')} {mode}", ms=ms, ms_p10=p10, ms_p90=p90, gbs=gbs, frac_copy_bw=gbs / copy_gbs,
                               saved_bytes_per_out=saved if mode == "fwd+bwd" else "")
            harness.add_speedups(report, times, shape=shape_name, dtype=str(dtype).replace("torch.", ""))
            for (name, mode), ms in times.items():
                layout = name.split()[-1]
                if device == "cpu" and name.startswith("ours") and (f"torch eager {layout}", mode) in times:
                    ratio = times[(f"torch eager {layout}", mode)] / ms
                    cpu_verdicts.append(f"{shape_name} {layout} {mode}: {ratio:.2f}x"
                                        f" ({'meets' if ratio >= CPU_TARGET else 'BELOW'} {CPU_TARGET}x)")
    if cpu_verdicts:
        report.note(f"CPU speedup over F.max_pool2d at N={n} (target {CPU_TARGET}x): " + "; ".join(cpu_verdicts))
    report.write(plot=("case", "frac_copy_bw" if device == "cuda" else "ms", "impl"))



if __name__ == "__main__":
    main()
    harness.print_sass_model("pool")
