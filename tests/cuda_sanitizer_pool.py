"""A small max-pool case for compute-sanitizer (memcheck, racecheck):
`compute-sanitizer --tool racecheck python tests/cuda_sanitizer_pool.py`.
Forward (with and without argmax) and backward in every dtype and layout,
through the shared-memory fast path, the general path and int32 offsets."""
import torch

import alexnet_ext


def pool_case():
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


if __name__ == "__main__":
    pool_case()
    print("sanitizer case done: pool")
