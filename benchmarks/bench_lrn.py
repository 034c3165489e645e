"""LRN: alexnet_ext against PyTorch eager, torch.compile and cuDNN.

    python benchmarks/bench_lrn.py [--out DIR] [--quick]

AlexNet's LRN shapes (size 5, alpha 1e-4, beta 0.75, k 2), forward and
forward+backward. On a GPU: N=128, float32/bfloat16/float16, time, GB/s on
the minimal bytes (forward reads x and writes y; backward reads x and dy and
writes dx) and its fraction of the copy bandwidth measured in the same run,
and our speedup over each baseline. On the CPU: N=16, float32, ours against
F.local_response_norm. Writes benchmarks/results/lrn_<device>.{csv,md,png}.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import alexnet_ext  # noqa: E402

SHAPES = {"lrn1 96x55x55": (96, 55, 55), "lrn2 256x27x27": (256, 27, 27)}
HP = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)


def ours(x):
    return alexnet_ext.functional.local_response_norm(x, **HP)


def eager(x):
    return F.local_response_norm(x, **HP)


def implementations(device, dtype, cudnn):
    """name -> (forward(x), forward+backward(x, dy), layout), the baselines
    the machine has."""
    impls = {}
    for layout in ("nchw", "channels_last"):
        impls[f"ours {layout}"] = (ours, harness.fwd_bwd(ours), layout)
        impls[f"torch eager {layout}"] = (eager, harness.fwd_bwd(eager), layout)
    if device == "cuda":
        compiled = torch.compile(eager, dynamic=False)
        impls["torch.compile nchw"] = (compiled, harness.fwd_bwd(compiled), "nchw")
        if cudnn is not None:
            def cudnn_fwd(x):
                return cudnn.forward(x, HP["size"], HP["alpha"], HP["beta"], HP["k"])

            def cudnn_fb(x, dy):
                y = cudnn_fwd(x)
                return cudnn.backward(y, dy, x, HP["size"], HP["alpha"], HP["beta"], HP["k"])
            impls["cudnn nchw"] = (cudnn_fwd, cudnn_fb, "nchw")
    return impls


def main(argv=None):
    args = harness.parse_args(__doc__, argv)
    device = args.device
    report = harness.Report("lrn", args, title="Cross-channel LRN (size 5)")
    cudnn, why = (None, "no GPU")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        from baselines import load_cudnn_lrn
        cudnn, why = load_cudnn_lrn()
    else:
        report.note("No GPU visible: CPU rows only; every CUDA row (ours, eager, torch.compile, cuDNN) was skipped.")
    if device == "cuda" and cudnn is None:
        report.note(f"cuDNN rows skipped: {why}")
    copy_gbs = harness.copy_bandwidth_gbs(device)
    report.note(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s (bytes read + written)")
    n = 128 if device == "cuda" else (4 if args.quick else 16)
    dtypes = [torch.float32, torch.bfloat16, torch.float16] if device == "cuda" else [torch.float32]
    reps = args.reps if device == "cuda" else max(3, args.reps // 5)
    for shape_name, shape in SHAPES.items():
        for dtype in dtypes:
            numel = n * shape[0] * shape[1] * shape[2]
            elem = torch.finfo(dtype).bits // 8
            impls = implementations(device, dtype, cudnn)
            times = {}
            for name, (fwd, fb, layout) in impls.items():
                sets = harness.make_sets(harness.rotation(3 * numel * elem, device), (n, *shape), (n, *shape),
                                         dtype, device, layout)
                for mode, fn, nbytes in (("fwd", lambda i: fwd(sets[i][0]), 2 * numel * elem),
                                         ("fwd+bwd", lambda i: fb(*sets[i]), 5 * numel * elem)):
                    try:
                        ms, (p10, p90) = harness.time_ms(fn, device, len(sets), args.warmup, reps)
                    except Exception as err:  # e.g. a dtype cuDNN's LRN does not take
                        report.note(f"{name} {mode} {shape_name} {dtype}: skipped ({type(err).__name__}: {err})"[:300])
                        continue
                    times[(name, mode)] = ms
                    gbs = nbytes / (ms * 1e-3) / 1e9
                    report.add(shape=shape_name, dtype=str(dtype).replace("torch.", ""), mode=mode, impl=name,
                               ms=ms, ms_p10=p10, ms_p90=p90, gbs=gbs, frac_copy_bw=gbs / copy_gbs)
            harness.add_speedups(report, times, shape=shape_name, dtype=str(dtype).replace("torch.", ""))
    report.write(plot=("shape", "frac_copy_bw", "impl") if device == "cuda" else ("mode", "ms", "impl"))



if __name__ == "__main__":
    main()
    harness.print_sass_model("lrn")
