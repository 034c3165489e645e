"""Fused conv2d + bias + ReLU on AlexNet's conv layers: alexnet_ext vs cuDNN
(F.relu(F.conv2d(...)) eager, cudnn.benchmark = True) vs torch.compile of the
same, channels_last, float32 (TF32, PyTorch's default for convolutions) and
bfloat16, forward and forward+backward. Reports ms, TFLOP/s and the time
ratio ours / eager per layer.

    python benchmarks/bench_conv.py [--out DIR] [--quick] [--device cpu|cuda]

Without a GPU only the CPU smoke rows run (batch 2, float32): they check the
script and the operator end to end, they are not a performance target.

It first prints the static model of the CUDA kernels on these layers
(tools/conv_model.py: executed/useful MMA FLOPs, waves, SASS per MMA of the
k-loop; no GPU needed; committed as benchmarks/results/conv_model.md) and the
bytes moved by the passes around the kernels (tools/conv_passes.py,
benchmarks/results/conv_passes.md).
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import alexnet_ext  # noqa: E402
from alexnet_ext.functional import conv2d_relu  # noqa: E402

# name: (C, H, K, R, stride, padding, groups), square inputs and kernels.
LAYERS = [
    ("conv1", (3, 224, 96, 11, 4, 2, 1)),
    ("conv2", (96, 27, 256, 5, 1, 2, 1)),
    ("conv2/g2", (96, 27, 256, 5, 1, 2, 2)),
    ("conv3", (256, 13, 384, 3, 1, 1, 1)),
    ("conv4", (384, 13, 384, 3, 1, 1, 1)),
    ("conv4/g2", (384, 13, 384, 3, 1, 1, 2)),
    ("conv5", (384, 13, 256, 3, 1, 1, 1)),
    ("conv5/g2", (384, 13, 256, 3, 1, 1, 2)),
]


def eager(x, w, b, stride, padding, groups):
    return F.relu(F.conv2d(x, w, b, stride, padding, groups=groups))


def ours(x, w, b, stride, padding, groups):
    return conv2d_relu(x, w, b, stride, padding, groups)


def flops(n, spec):
    c, h, k, r, stride, padding, groups = spec
    p = (h + 2 * padding - r) // stride + 1
    return 2.0 * n * k * p * p * (c // groups) * r * r


def make_sets(n, spec, dtype, device, n_sets, grad):
    c, h, k, r, stride, padding, groups = spec
    sets = []
    for _ in range(n_sets):
        x = torch.randn(n, c, h, h, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(k, c // groups, r, r, device=device, dtype=dtype) * (c // groups * r * r) ** -0.5)
        w = w.contiguous(memory_format=torch.channels_last)
        b = torch.randn(k, device=device, dtype=dtype) * 0.1
        for t in (x, w, b):
            t.requires_grad_(grad)
        sets.append((x, w, b))
    return sets


def bench_layer(report, args, device, n, name, spec, dtype, compiled):
    c, h, k, r, stride, padding, groups = spec
    bytes_per_set = n * c * h * h * torch.finfo(dtype).bits // 8
    n_sets = harness.rotation(bytes_per_set, device) if device == "cuda" else 2
    impls = {"ours": ours, "cudnn eager" if device == "cuda" else "aten eager": eager}
    if compiled is not None:
        impls["torch.compile"] = compiled
    for mode in ("fwd", "fwd+bwd"):
        grad = mode == "fwd+bwd"
        sets = make_sets(n, spec, dtype, device, n_sets, grad)
        with torch.no_grad():
            upstream = torch.randn_like(eager(*sets[0], stride, padding, groups))
        times = {}
        for impl, fn in impls.items():  # "ours" first: the other rows are compared with it
            def run(i, fn=fn):
                x, w, b = sets[i]
                y = fn(x, w, b, stride, padding, groups)
                if grad:
                    y.backward(upstream)

            ms, (lo, hi) = harness.time_ms(run, device, n_sets=n_sets, warmup=args.warmup, reps=args.reps)
            times[impl] = ms
            fl = flops(n, spec) * (3 if grad else 1)  # backward = dgrad + wgrad, each as many flops as forward
            report.add(layer=name, groups=groups, dtype=str(dtype).replace("torch.", ""), mode=mode, impl=impl,
                       ms=ms, p10_ms=lo, p90_ms=hi, tflops=fl / (ms * 1e-3) / 1e12,
                       ours_over_this=times["ours"] / ms)


def print_conv_model():
    """tools/conv_model.py's table; it never fails a benchmark run."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    try:
        import conv_model
        conv_model.main([])
    except Exception as err:
        print(f"conv_model: skipped ({type(err).__name__}: {err})")


def print_conv_passes():
    """tools/conv_passes.py's static account of the bytes moved around the
    GEMM kernels (no GPU, a few milliseconds)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    try:
        import conv_passes
        conv_passes.main([])
    except Exception as err:
        print(f"conv_passes: skipped ({type(err).__name__}: {err})")


def main(argv=None):
    print_conv_model()
    print_conv_passes()
    args = harness.parse_args(__doc__.splitlines()[0], argv,
                              extra=lambda ap: ap.add_argument("--no-compile", action="store_true",
                                                               help="skip the torch.compile baseline"))
    report = harness.Report("conv", args, title="conv2d + bias + ReLU (AlexNet layers)")
    if args.device == "cuda" and not alexnet_ext.cuda_kernels_compiled():
        sys.exit("bench_conv: alexnet_ext was built without CUDA kernels; rebuild on a GPU machine")
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True
        n, dtypes = 128, (torch.float32, torch.bfloat16)
        report.note("N = 128, channels_last; float32 runs in TF32 (cudnn.allow_tf32 = True) in every implementation. "
                    "ours_over_this = time(ours) / time(this row): below 1 means ours is faster.")
    else:
        report.note("CUDA rows skipped: no GPU visible (or --device cpu). CPU smoke rows: batch 2, float32; "
                    "the CPU path is ATen's convolution plus a fused bias + ReLU pass, not a performance target.")
        print("bench_conv: no GPU, CUDA rows skipped; running the CPU smoke rows")
        n, dtypes = 2, (torch.float32,)
    layers = LAYERS[:3] + LAYERS[5:6] if args.quick else LAYERS
    for dtype in dtypes:
        for name, spec in layers:
            compiled = None
            if args.device == "cuda" and not args.no_compile:
                torch._dynamo.reset()
                compiled = torch.compile(eager)
            bench_layer(report, args, args.device, n, name, spec, dtype, compiled)
    report.write(plot=("layer", "tflops", "impl"))


if __name__ == "__main__":
    main()
