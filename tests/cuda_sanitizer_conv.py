"""Small CUDA case for compute-sanitizer (memcheck, racecheck):
`compute-sanitizer --tool memcheck python tests/cuda_sanitizer_conv.py`.
Forward and backward once per dtype, layout and TF32 setting, on shapes that
leave partial tiles in every GEMM dimension and use groups, stride, padding
and channel padding (C = 3)."""
import torch

import alexnet_ext


def conv_case():
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


if __name__ == "__main__":
    conv_case()
    print("sanitizer case done: conv")
