"""Small CUDA cases for compute-sanitizer (memcheck, racecheck):
`compute-sanitizer --tool memcheck python tests/sanitizer_cases.py lrn`.
Each case runs forward and backward in every dtype and layout once; every
op adds its case to CASES (tools/gpu_report.sh runs them all)."""
import sys

import torch

import alexnet_ext


def lrn_case():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for cl in (False, True):
            x = torch.randn(2, 37, 5, 7, device="cuda", dtype=dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            y = alexnet_ext.functional.local_response_norm(x, 5, 1e-3, 0.75, 2.0)
            y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


def pool_case():
    # Forward without and with argmax, then backward: the staged-plane 3x3/s2
    # path (floor and ceil_mode), the per-output path with padding, and a
    # window large enough for int32 offsets.
    windows = [((2, 5, 27, 27), 3, 2, 0, False), ((2, 5, 27, 27), 3, 2, 0, True),
               ((2, 3, 11, 13), 3, 2, 1, True), ((1, 2, 21, 20), 17, 2, 8, False)]
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for shape, k, s, p, ceil_mode in windows:
                x = torch.randn(shape, device="cuda", dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                alexnet_ext.functional.max_pool2d(x, k, s, p, ceil_mode)
                x.requires_grad_()
                y = alexnet_ext.functional.max_pool2d(x, k, s, p, ceil_mode)
                y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


def conv_case():
    # Partial tiles in every GEMM dimension, groups, stride, padding and
    # channel padding (C = 3), with TF32 on and off.
    f = alexnet_ext.functional.conv2d_relu
    shapes = [((2, 3, 19, 17), (20, 3, 5, 5), 3, 2, 1), ((2, 16, 9, 7), (24, 8, 3, 3), 1, 1, 2)]
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            for cl in (False, True):
                for xs, ws, stride, padding, groups in shapes:
                    x = torch.randn(xs, device="cuda", dtype=dtype)
                    if cl:
                        x = x.contiguous(memory_format=torch.channels_last)
                    x.requires_grad_()
                    w = torch.randn(ws, device="cuda", dtype=dtype, requires_grad=True)
                    b = torch.randn(ws[0], device="cuda", dtype=dtype, requires_grad=True)
                    y = f(x, w, b, stride, padding, groups)
                    y.backward(torch.randn_like(y))
    torch.cuda.synchronize()
    torch.backends.cudnn.allow_tf32 = True


def fused_case():
    # Fused LRN + max-pool: AlexNet's 3x3/2 (floor and ceil_mode), padding,
    # a rectangular window, forward without and with argmax, then backward.
    f = alexnet_ext.functional.local_response_norm_max_pool2d
    windows = [((2, 9, 13, 13), 5, 3, 2, 0, False), ((2, 7, 12, 11), 3, 3, 2, 1, True),
               ((1, 5, 9, 8), 4, (2, 3), (2, 1), 0, False)]
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        for channels_last in (False, True):
            for shape, size, k, s, p, ceil_mode in windows:
                x = torch.randn(shape, device="cuda", dtype=dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                f(x, size, 1e-3, 0.75, 2.0, k, s, p, ceil_mode)
                x.requires_grad_()
                y = f(x, size, 1e-3, 0.75, 2.0, k, s, p, ceil_mode)
                y.backward(torch.randn_like(y))
    torch.cuda.synchronize()


CASES = {"lrn": lrn_case, "pool": pool_case, "conv": conv_case, "fused": fused_case}

if __name__ == "__main__":
    if sys.argv[1:] == ["--list"]:
        print(" ".join(CASES))
        sys.exit(0)
    names = sys.argv[1:] or list(CASES)
    for name in names:
        CASES[name]()
    print("sanitizer cases done:", ", ".join(names))
