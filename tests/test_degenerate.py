"""Degenerate and hostile arguments for every operator, each case in a child
process so that a crash (or a hang) fails that case instead of pytest.

The property every case checks:
  - where PyTorch accepts the input, our result equals torch.nn.functional's
    (forward, and the gradients the case asks for);
  - otherwise our op raises RuntimeError, ValueError or TypeError whose
    message names the offending argument.
Two documented kinds of exception to the first rule, marked per case:
  - `limitation`: PyTorch accepts it and we raise a clear error instead
    (dilation, strides beyond 32 bits, ...), the reason is given;
  - `extension`: PyTorch rejects it and we return a well-defined empty result
    (zero channels), checked by the case.
The raw operators' backward entry points have no PyTorch counterpart: hostile
saved tensors there must be rejected.

Cases run in one worker process, one after another; a worker that dies or
stops answering fails the case it was running and is replaced for the next.
"""
import json
import math
import os
import re
import select
import subprocess
import sys
import time

import pytest

ACCEPTED_ERRORS = (RuntimeError, ValueError, TypeError)
CASE_TIMEOUT_S = 30   # every case is a few small tensors: longer means it hangs
START_TIMEOUT_S = 180  # importing torch on a loaded 2-core machine
BIG = 2**31 - 1

CASES = {}


def case(name, arg, build, grad=False, limitation=None, extension=None):
    """Registers a case. build() makes fresh inputs and returns (ours, reference):
    zero-argument callables returning a tensor or a tuple of tensors;
    reference is None where PyTorch has no counterpart. `arg` is the argument
    an error must name. With grad=True, `ours`/`reference` return the output
    and the gradients (see fwd_bwd)."""
    assert name not in CASES, name
    CASES[name] = dict(build=build, arg=arg, grad=grad, limitation=limitation, extension=extension)


# --------------------------------------------------------------------------
# Case definitions (imported by the worker; torch is imported lazily so that
# collecting this module stays cheap).

def define_cases():
    if CASES:
        return
    import torch
    import torch.nn.functional as F

    import alexnet_ext
    from alexnet_ext import functional as AF
    from alexnet_ext import nn as ANN

    ops = torch.ops.alexnet_ext

    def randn(*shape, dtype=torch.float64):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    def fwd_bwd(fn, *inputs):
        """fn(*inputs) and the gradients of a fixed upstream gradient with
        respect to every input (zeros for an empty output)."""
        def run():
            xs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
            out = fn(*xs)
            leaves = [t for t in xs if t is not None]
            g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
            grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
            return (out, *[torch.zeros_like(x) if d is None else d for d, x in zip(grads, leaves)])
        return run

    def same_inputs(ours, ref):
        return lambda: (ours, ref)

    # ---------------------------------------------------------------- LRN
    lrn_ours = lambda size, alpha=1e-4, beta=0.75, k=1.0: lambda x: AF.local_response_norm(x, size, alpha, beta, k)  # noqa: E731
    lrn_ref = lambda size, alpha=1e-4, beta=0.75, k=1.0: lambda x: F.local_response_norm(x, size, alpha, beta, k)  # noqa: E731

    def lrn_case(name, arg, x, size=5, alpha=1e-4, beta=0.75, k=1.0, grad=True, **kw):
        def build():
            t = x() if callable(x) else x
            if grad:
                return fwd_bwd(lrn_ours(size, alpha, beta, k), t), fwd_bwd(lrn_ref(size, alpha, beta, k), t)
            return (lambda: lrn_ours(size, alpha, beta, k)(t)), (lambda: lrn_ref(size, alpha, beta, k)(t))
        case(name, arg, build, grad=grad, **kw)

    lrn_case("lrn-zero-batch", "input", lambda: randn(0, 4, 5, 5))
    lrn_case("lrn-zero-channels", "input", lambda: randn(2, 0, 5, 5))
    lrn_case("lrn-zero-height", "input", lambda: randn(2, 4, 0, 5))
    lrn_case("lrn-zero-length-3d", "input", lambda: randn(2, 4, 0))
    lrn_case("lrn-5d-zero-depth", "input", lambda: randn(1, 4, 0, 3, 3))
    lrn_case("lrn-rank-2", "input", lambda: randn(4, 5), grad=False)
    lrn_case("lrn-rank-0", "input", lambda: torch.tensor(1.0, dtype=torch.float64), grad=False)
    lrn_case("lrn-size-0", "size", lambda: randn(1, 4, 3, 3), size=0, grad=False)
    lrn_case("lrn-size-negative", "size", lambda: randn(1, 4, 3, 3), size=-3, grad=False)
    lrn_case("lrn-size-int32-max", "size", lambda: randn(1, 4, 3, 3), size=BIG, grad=False,
             limitation="windows over 2**30 channels are rejected; PyTorch would pad the input with 2**30 zero "
                        "channels on each side (many GiB)")
    lrn_case("lrn-size-much-wider-than-channels", "size", lambda: randn(1, 3, 2, 2), size=100001)
    lrn_case("lrn-size-float", "size", lambda: randn(1, 4, 3, 3), size=2.5, grad=False,
             limitation="a fractional `size` is rejected (PyTorch silently truncates it in its padding)")
    lrn_case("lrn-k-inf", "k", lambda: randn(1, 4, 3, 3), k=math.inf, grad=False,
             limitation="`k` must be finite and >= 0 (PyTorch returns zeros for k=inf)")
    lrn_case("lrn-k-nan", "k", lambda: randn(1, 4, 3, 3), k=math.nan, grad=False,
             limitation="`k` must be finite and >= 0 (PyTorch returns NaN)")
    lrn_case("lrn-k-negative", "k", lambda: randn(1, 4, 3, 3), k=-1.0, grad=False,
             limitation="`k` must be >= 0: a negative base gives NaN for fractional beta")
    lrn_case("lrn-alpha-nan", "alpha", lambda: randn(1, 4, 3, 3), alpha=math.nan)
    lrn_case("lrn-alpha-inf", "alpha", lambda: randn(1, 4, 3, 3), alpha=math.inf)
    lrn_case("lrn-beta-nan", "beta", lambda: randn(1, 4, 3, 3), beta=math.nan)
    lrn_case("lrn-beta-zero", "beta", lambda: randn(1, 4, 3, 3), beta=0.0)
    lrn_case("lrn-nonfinite-input", "input",
             lambda: torch.tensor([1.0, math.inf, -2.0, math.nan, 3.0, 0.5, -1.0, 2.0],
                                  dtype=torch.float64).reshape(1, 8, 1, 1), size=3, grad=False)
    lrn_case("lrn-int64-input", "input", lambda: torch.ones(1, 4, 3, 3, dtype=torch.int64), grad=False,
             limitation="only floating dtypes are implemented (PyTorch's CPU LRN also takes int64)")
    lrn_case("lrn-bool-input", "input", lambda: torch.ones(1, 4, 3, 3, dtype=torch.bool), grad=False)
    lrn_case("lrn-complex-input", "input", lambda: torch.ones(1, 4, 3, 3, dtype=torch.complex64), grad=False)
    lrn_case("lrn-expanded-input", "input", lambda: randn(1, 4, 1, 1).expand(2, 4, 3, 5))
    lrn_case("lrn-overlapping-view", "input",
             lambda: torch.as_strided(randn(64), (2, 4, 3, 3), (5, 3, 2, 1)))

    def lrn_float16_large_values():
        # x^2 overflows float16 above 256; PyTorch's CPU LRN has no float16
        # kernel, so the reference is float64 rounded to float16.
        x = randn(1, 8, 4, 4, dtype=torch.float16) * 1000
        return (lambda: AF.local_response_norm(x, 5)), (lambda: F.local_response_norm(x.double(), 5).half())
    case("lrn-float16-large-values", "input", lrn_float16_large_values)

    def lrn_raw_backward(name, arg, dy, x, size=5):
        def build():
            d, t = dy(), x()
            return (lambda: ops.lrn_backward(d, t, size, 1e-4, 0.75, 1.0)), None
        case(name, arg, build)

    lrn_raw_backward("lrn-raw-backward-shape-mismatch", "grad_output", lambda: randn(1, 4, 3, 3),
                     lambda: randn(1, 4, 3, 4))
    lrn_raw_backward("lrn-raw-backward-dtype-mismatch", "grad_output", lambda: randn(1, 4, 3, 3, dtype=torch.float32),
                     lambda: randn(1, 4, 3, 3))
    lrn_raw_backward("lrn-raw-backward-int-grad", "grad_output", lambda: torch.ones(1, 4, 3, 3, dtype=torch.int32),
                     lambda: randn(1, 4, 3, 3))
    lrn_raw_backward("lrn-raw-backward-size-0", "size", lambda: randn(1, 4, 3, 3), lambda: randn(1, 4, 3, 3), size=0)

    def lrn_module_zero_batch():
        x = randn(0, 6, 4, 4)
        return (fwd_bwd(ANN.LocalResponseNorm(3), x), fwd_bwd(torch.nn.LocalResponseNorm(3), x))
    case("lrn-module-zero-batch", "input", lrn_module_zero_batch, grad=True)

    # ----------------------------------------------------------- max-pool
    def pool_case(name, arg, x, kernel_size, stride=None, padding=0, ceil_mode=False, dilation=1, grad=True,
                  module=False, layout=None, **kw):
        def build():
            t = x()
            if layout == "channels_last":
                t = t.contiguous(memory_format=torch.channels_last)
            if module:
                ours = ANN.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
                ref = torch.nn.MaxPool2d(kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
            else:
                ours = lambda v: AF.max_pool2d(v, kernel_size, stride, padding, ceil_mode, dilation=dilation)  # noqa: E731
                ref = lambda v: F.max_pool2d(v, kernel_size, stride, padding, dilation, ceil_mode)  # noqa: E731
            if grad:
                return fwd_bwd(ours, t), fwd_bwd(ref, t)
            return (lambda: ours(t)), (lambda: ref(t))
        case(name, arg, build, grad=grad, **kw)

    # Defect 1: zero height/width, with padding and ceil_mode giving a non-empty output.
    pool_case("pool-zero-height-ceil-pad", "input", lambda: randn(1, 1, 0, 5), 3, 2, 1, True)
    pool_case("pool-zero-width-ceil-pad", "input", lambda: randn(1, 1, 5, 0), 3, 2, 1, True)
    pool_case("pool-zero-height-channels-last", "input", lambda: randn(2, 3, 0, 5), 3, 2, 1, True,
              layout="channels_last")
    pool_case("pool-zero-height-3d", "input", lambda: randn(2, 0, 5), 3, 2, 1, True)
    pool_case("pool-zero-height-module", "input", lambda: randn(1, 1, 0, 5), 3, 2, 1, True, module=True)
    pool_case("pool-zero-height-zero-batch", "input", lambda: randn(0, 1, 0, 5), 3, 2, 1, True)
    pool_case("pool-zero-batch", "input", lambda: randn(0, 3, 7, 7), 3, 2)
    pool_case("pool-zero-batch-channels-last", "input", lambda: randn(0, 3, 7, 7), 3, 2, 1, True,
              layout="channels_last")

    def check_zero_channels(out):
        out = out[0] if isinstance(out, tuple) else out
        assert tuple(out.shape) == (2, 0, 3, 3), out.shape
    pool_case("pool-zero-channels", "input", lambda: randn(2, 0, 7, 7), 3, 2, grad=False,
              extension=check_zero_channels)
    pool_case("pool-one-pixel-ceil-pad", "input", lambda: randn(2, 3, 1, 1), 3, 2, 1, True)
    # Defect 2: strides near INT_MAX (covering_outputs overflowed).
    pool_case("pool-stride-int32-max", "stride", lambda: randn(3, 2, 5, 6), (3, 2), (BIG, 1), (1, 1), True)
    pool_case("pool-stride-int32-max-channels-last", "stride", lambda: randn(2, 3, 5, 6), (3, 4), (1, BIG), (1, 2),
              True, layout="channels_last")
    pool_case("pool-stride-int32-max-both", "stride", lambda: randn(1, 2, 4, 4), 2, BIG, 1, True)
    pool_case("pool-stride-2pow31", "stride", lambda: randn(1, 1, 4, 4), 2, 2**31, grad=False,
              limitation="strides must fit in 32 bits (the kernels index planes with int)")
    pool_case("pool-stride-2pow63", "stride", lambda: randn(1, 1, 4, 4), 2, 2**63, grad=False)
    pool_case("pool-stride-zero", "stride", lambda: randn(1, 1, 4, 4), 2, 0, grad=False)
    pool_case("pool-stride-negative", "stride", lambda: randn(1, 1, 4, 4), 2, -1, grad=False)
    pool_case("pool-kernel-int32-max", "kernel_size", lambda: randn(1, 1, 4, 4), BIG, 1, grad=False)
    pool_case("pool-kernel-int32-max-ceil", "input", lambda: randn(1, 1, 4, 4), (BIG, 1), 1, 0, True, grad=False)
    pool_case("pool-kernel-2pow32", "kernel_size", lambda: randn(1, 1, 4, 4), 2**32, 1, grad=False,
              limitation="kernel sizes must fit in 32 bits")
    pool_case("pool-kernel-zero", "kernel_size", lambda: randn(1, 1, 4, 4), 0, 1, grad=False)
    pool_case("pool-kernel-negative", "kernel_size", lambda: randn(1, 1, 4, 4), -2, 1, grad=False)
    pool_case("pool-kernel-float", "kernel_size", lambda: randn(1, 1, 4, 4), 2.0, 1, grad=False,
              limitation="kernel_size must be an int (PyTorch truncates floats)")
    pool_case("pool-kernel-nan", "kernel_size", lambda: randn(1, 1, 4, 4), math.nan, 1, grad=False)
    pool_case("pool-kernel-three-elements", "kernel_size", lambda: randn(1, 1, 4, 4), (2, 2, 2), 1, grad=False)
    pool_case("pool-padding-negative", "padding", lambda: randn(1, 1, 4, 4), 3, 1, -1, grad=False)
    pool_case("pool-padding-over-half", "padding", lambda: randn(1, 1, 4, 4), 3, 1, 2, grad=False)
    pool_case("pool-padding-int32-max", "padding", lambda: randn(1, 1, 4, 4), 3, 1, BIG, grad=False)
    pool_case("pool-huge-kernel-and-padding", "kernel_size", lambda: randn(1, 1, 3, 3), 2**30, 1, 2**29, grad=False,
              limitation="windows over 2**31 - 1 elements are rejected (argmax offsets are int32)")
    pool_case("pool-huge-kernel-one-row", "input", lambda: randn(2, 2, 3, 3), (1, 2**30), 1, (0, 2**29), True)
    pool_case("pool-dilation-2", "dilation", lambda: randn(1, 1, 6, 6), 2, 1, dilation=2, grad=False,
              limitation="dilation other than 1 is not implemented")
    pool_case("pool-rank-2", "input", lambda: randn(4, 4), 2, 1, grad=False)
    pool_case("pool-rank-5", "input", lambda: randn(1, 1, 1, 4, 4), 2, 1, grad=False)
    pool_case("pool-int64-input", "input", lambda: torch.arange(16).reshape(1, 1, 4, 4), 2, 1, grad=False,
              limitation="only floating dtypes are implemented (PyTorch also pools int64 on the CPU)")
    pool_case("pool-bool-input", "input", lambda: torch.ones(1, 1, 4, 4, dtype=torch.bool), 2, 1, grad=False)
    pool_case("pool-complex-input", "input", lambda: torch.ones(1, 1, 4, 4, dtype=torch.complex64), 2, 1,
              grad=False)
    pool_case("pool-expanded-input", "input", lambda: randn(1, 3, 1, 1).expand(2, 3, 6, 7), 3, 2, 1, True)
    pool_case("pool-overlapping-view", "input", lambda: torch.as_strided(randn(80), (2, 3, 6, 6), (7, 5, 3, 1)),
              3, 2, 1)
    pool_case("pool-nonfinite-input", "input",
              lambda: torch.tensor([[1.0, math.nan, -math.inf], [math.inf, 2.0, math.nan], [0.0, -1.0, 3.0]],
                                   dtype=torch.float64).reshape(1, 1, 3, 3), 2, 1, grad=False)
    pool_case("pool-module-stride-none", "input", lambda: randn(2, 3, 7, 7), 3, None, 1, True, module=True)

    def pool_raw_forward(name, arg, x, kernel_size, stride, padding, ceil_mode=False, like_functional=True, **kw):
        """The raw forward operator; like_functional=False where its schema
        is stricter than F.max_pool2d's (exactly 4-D input, pairs)."""
        def build():
            t = x()
            ours = lambda: ops.max_pool2d_forward(t, kernel_size, stride, padding, ceil_mode, True)[0]  # noqa: E731
            ref = lambda: F.max_pool2d(t, kernel_size, stride, padding, 1, ceil_mode)  # noqa: E731
            return ours, ref if like_functional else None
        case(name, arg, build, **kw)

    pool_raw_forward("pool-raw-forward-zero-height", "input", lambda: randn(1, 1, 0, 5), [3, 3], [2, 2], [1, 1],
                     True)
    pool_raw_forward("pool-raw-forward-one-element-kernel", "kernel_size", lambda: randn(1, 1, 4, 4), [2], [1, 1],
                     [0, 0], like_functional=False)
    pool_raw_forward("pool-raw-forward-rank-3", "input", lambda: randn(1, 4, 4), [2, 2], [1, 1], [0, 0],
                     like_functional=False)
    pool_raw_forward("pool-raw-forward-zero-batch", "input", lambda: randn(0, 2, 5, 5), [3, 3], [2, 2], [1, 1], True)
    pool_raw_forward("pool-raw-forward-stride-int32-max", "stride", lambda: randn(2, 2, 5, 5), [3, 3], [BIG, BIG],
                     [1, 1], True)

    # Raw backward operator with saved tensors PyTorch never makes (defect 3).
    def pool_raw_backward(name, arg, grad_output, argmax, input_size, kernel_size=(3, 3), stride=(2, 2),
                          padding=(0, 0), ceil_mode=False, layout=None):
        def build():
            g, a = grad_output(), argmax()
            if layout == "channels_last":
                g, a = (t.contiguous(memory_format=torch.channels_last) for t in (g, a))
            return (lambda: ops.max_pool2d_backward(g, a, list(input_size), list(kernel_size), list(stride),
                                                    list(padding), ceil_mode)), None
        case(name, arg, build)

    u8 = lambda shape, v: (lambda: torch.full(shape, v, dtype=torch.uint8))  # noqa: E731
    pool_raw_backward("pool-raw-backward-zero-height", "input_size", lambda: randn(1, 1, 1, 3), u8((1, 1, 1, 3), 0),
                      (1, 1, 0, 5), padding=(1, 1), ceil_mode=True)
    pool_raw_backward("pool-raw-backward-argmax-out-of-window", "argmax", lambda: randn(2, 3, 4, 4),
                      u8((2, 3, 4, 4), 255), (2, 3, 9, 9))
    pool_raw_backward("pool-raw-backward-argmax-out-of-window-channels-last", "argmax", lambda: randn(2, 3, 4, 4),
                      u8((2, 3, 4, 4), 9), (2, 3, 9, 9), layout="channels_last")
    pool_raw_backward("pool-raw-backward-argmax-out-of-window-general", "argmax", lambda: randn(1, 2, 4, 4),
                      u8((1, 2, 4, 4), 200), (1, 2, 5, 5), kernel_size=(2, 2), stride=(1, 1))
    pool_raw_backward("pool-raw-backward-argmax-in-padding", "argmax", lambda: randn(1, 2, 5, 5),
                      u8((1, 2, 5, 5), 0), (1, 2, 9, 9), padding=(1, 1))
    pool_raw_backward("pool-raw-backward-argmax-negative-int32", "argmax", lambda: randn(1, 1, 2, 2),
                      lambda: torch.full((1, 1, 2, 2), -5, dtype=torch.int32), (1, 1, 34, 34),
                      kernel_size=(17, 17), stride=(16, 16))
    pool_raw_backward("pool-raw-backward-argmax-int64", "argmax", lambda: randn(1, 1, 4, 4),
                      lambda: torch.zeros(1, 1, 4, 4, dtype=torch.int64), (1, 1, 9, 9))
    pool_raw_backward("pool-raw-backward-argmax-wrong-shape", "argmax", lambda: randn(1, 1, 4, 4),
                      u8((1, 1, 4, 3), 0), (1, 1, 9, 9))
    pool_raw_backward("pool-raw-backward-argmax-empty", "argmax", lambda: randn(1, 1, 4, 4),
                      lambda: torch.empty(0, dtype=torch.uint8), (1, 1, 9, 9))
    pool_raw_backward("pool-raw-backward-int-grad", "grad_output", lambda: torch.ones(1, 1, 4, 4, dtype=torch.int32),
                      u8((1, 1, 4, 4), 0), (1, 1, 9, 9))
    pool_raw_backward("pool-raw-backward-negative-input-size", "input_size", lambda: randn(1, 1, 4, 4),
                      u8((1, 1, 4, 4), 0), (-1, 1, 9, 9))
    pool_raw_backward("pool-raw-backward-input-size-rank-3", "input_size", lambda: randn(1, 4, 4),
                      u8((1, 4, 4), 0), (1, 9, 9))

    # ------------------------------------------------------- conv2d_relu
    ref_conv = lambda x, w, b=None, stride=1, padding=0, groups=1, dilation=1: F.relu(  # noqa: E731
        F.conv2d(x, w, b, stride, padding, dilation, groups))

    def conv_case(name, arg, x, w, b=None, stride=1, padding=0, groups=1, dilation=1, grad=True, module=False,
                  **kw):
        def build():
            tx, tw = x(), w()
            tb = b() if b is not None else None
            ours = lambda i, k, c=None: AF.conv2d_relu(i, k, c, stride, padding, groups, dilation=dilation)  # noqa: E731
            ref = lambda i, k, c=None: ref_conv(i, k, c, stride, padding, groups, dilation)  # noqa: E731
            args = (tx, tw) if tb is None else (tx, tw, tb)
            if grad:
                return fwd_bwd(ours, *args), fwd_bwd(ref, *args)
            return (lambda: ours(*args)), (lambda: ref(*args))
        case(name, arg, build, grad=grad, **kw)

    conv_case("conv-zero-batch", "input", lambda: randn(0, 3, 6, 6), lambda: randn(4, 3, 3, 3), lambda: randn(4))
    conv_case("conv-zero-batch-channels-last", "input",
              lambda: randn(0, 3, 6, 6).contiguous(memory_format=torch.channels_last), lambda: randn(4, 3, 3, 3))
    conv_case("conv-zero-height-padded", "input", lambda: randn(1, 3, 0, 5), lambda: randn(4, 3, 1, 1),
              lambda: randn(4), padding=1)
    conv_case("conv-zero-height-zero-batch", "input", lambda: randn(0, 3, 0, 5), lambda: randn(4, 3, 1, 1),
              padding=1)
    conv_case("conv-zero-height", "input", lambda: randn(1, 3, 0, 5), lambda: randn(4, 3, 3, 3), grad=False)
    conv_case("conv-kernel-larger-than-input", "input", lambda: randn(1, 3, 2, 2), lambda: randn(4, 3, 3, 3),
              grad=False)
    conv_case("conv-zero-out-channels", "weight", lambda: randn(1, 3, 5, 5), lambda: randn(0, 3, 3, 3), grad=False,
              limitation="an empty `weight` is rejected (PyTorch returns an empty output)")
    conv_case("conv-zero-in-channels", "weight", lambda: randn(1, 0, 5, 5), lambda: randn(4, 0, 3, 3), grad=False,
              limitation="an empty `weight` is rejected (PyTorch returns ReLU(bias) planes)")
    conv_case("conv-stride-zero", "stride", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3), stride=0,
              grad=False)
    conv_case("conv-stride-negative", "stride", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3), stride=-1,
              grad=False)
    conv_case("conv-stride-int32-max", "stride", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3), stride=BIG,
              grad=False, limitation="strides and paddings must be below 2**20")
    conv_case("conv-stride-2pow63", "stride", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3), stride=2**63,
              grad=False)
    conv_case("conv-padding-negative", "padding", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3), padding=-1,
              grad=False)
    conv_case("conv-padding-int32-max", "padding", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3),
              padding=BIG, grad=False)
    conv_case("conv-padding-same-even-kernel", "padding", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 2, 2),
              padding="same", grad=False,
              limitation="padding='same' needs odd kernels (even ones pad asymmetrically in PyTorch)")
    conv_case("conv-padding-bad-string", "padding", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3),
              padding="full", grad=False)
    conv_case("conv-groups-zero", "groups", lambda: randn(1, 4, 5, 5), lambda: randn(4, 4, 3, 3), groups=0,
              grad=False)
    conv_case("conv-groups-negative", "groups", lambda: randn(1, 4, 5, 5), lambda: randn(4, 4, 3, 3), groups=-2,
              grad=False)
    conv_case("conv-groups-not-dividing", "groups", lambda: randn(1, 6, 5, 5), lambda: randn(4, 2, 3, 3), groups=3,
              grad=False)
    conv_case("conv-weight-channels-mismatch", "weight", lambda: randn(1, 3, 5, 5), lambda: randn(4, 2, 3, 3),
              grad=False)
    conv_case("conv-dtype-mismatch", "weight", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3, dtype=torch.float32),
              grad=False)
    conv_case("conv-bias-wrong-shape", "bias", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3),
              lambda: randn(5), grad=False)
    conv_case("conv-bias-wrong-dtype", "bias", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3, 3),
              lambda: randn(4, dtype=torch.float32), grad=False)
    conv_case("conv-int-input", "input", lambda: torch.ones(1, 3, 5, 5, dtype=torch.int64),
              lambda: torch.ones(4, 3, 3, 3, dtype=torch.int64), grad=False,
              limitation="only floating dtypes are implemented (PyTorch's CPU conv2d also takes int64)")
    conv_case("conv-complex-input", "input", lambda: torch.ones(1, 3, 5, 5, dtype=torch.complex64),
              lambda: torch.ones(4, 3, 3, 3, dtype=torch.complex64), grad=False)
    conv_case("conv-bool-input", "input", lambda: torch.ones(1, 3, 5, 5, dtype=torch.bool),
              lambda: torch.ones(4, 3, 3, 3, dtype=torch.bool), grad=False)
    conv_case("conv-rank-5-input", "input", lambda: randn(1, 1, 3, 5, 5), lambda: randn(4, 3, 3, 3), grad=False)
    conv_case("conv-rank-3-weight", "weight", lambda: randn(1, 3, 5, 5), lambda: randn(4, 3, 3), grad=False)
    conv_case("conv-dilation-2", "dilation", lambda: randn(1, 3, 7, 7), lambda: randn(4, 3, 3, 3), dilation=2,
              grad=False, limitation="dilation other than 1 is not implemented")
    conv_case("conv-expanded-input", "input", lambda: randn(1, 3, 1, 1).expand(2, 3, 6, 6),
              lambda: randn(4, 3, 3, 3), lambda: randn(4))
    conv_case("conv-expanded-weight", "weight", lambda: randn(2, 3, 6, 6), lambda: randn(1, 3, 1, 1).expand(4, 3, 3, 3))
    conv_case("conv-overlapping-view", "input", lambda: torch.as_strided(randn(100), (2, 3, 6, 6), (9, 4, 3, 1)),
              lambda: randn(4, 3, 3, 3))
    conv_case("conv-nonfinite-weight", "weight", lambda: randn(1, 2, 4, 4),
              lambda: torch.tensor([math.nan, 1.0, math.inf, -1.0] * 4, dtype=torch.float64).reshape(2, 2, 2, 2),
              grad=False)
    conv_case("conv-huge-kernel", "input", lambda: randn(1, 1, 4, 4), lambda: randn(1, 1, 1, 2**20), grad=False)

    def conv_module_zero_batch():
        torch.manual_seed(0)
        ours = ANN.Conv2dReLU(3, 4, 3, padding=1).double()
        ref = torch.nn.Conv2d(3, 4, 3, padding=1).double()
        ref.load_state_dict(ours.state_dict())
        x = randn(0, 3, 5, 5)
        return fwd_bwd(ours, x), fwd_bwd(lambda t: F.relu(ref(t)), x)
    case("conv-module-zero-batch", "input", conv_module_zero_batch, grad=True)

    def conv_raw_backward(name, arg, grad_output, output, input_shape=(1, 3, 5, 5), mask=(True, True, True)):
        def build():
            x, w = randn(*input_shape), randn(4, 3, 3, 3)
            g, y = grad_output(), output()
            return (lambda: ops.conv2d_relu_backward(g, x, w, y, [1, 1], [0, 0], 1, list(mask))), None
        case(name, arg, build)

    conv_raw_backward("conv-raw-backward-grad-wrong-shape", "grad_output", lambda: randn(1, 4, 3, 4),
                      lambda: randn(1, 4, 3, 3))
    conv_raw_backward("conv-raw-backward-output-wrong-dtype", "output", lambda: randn(1, 4, 3, 3),
                      lambda: randn(1, 4, 3, 3, dtype=torch.float32))
    conv_raw_backward("conv-raw-backward-int-grad", "grad_output", lambda: torch.ones(1, 4, 3, 3, dtype=torch.int32),
                      lambda: randn(1, 4, 3, 3))

    def conv_raw_forward_bad_pair():
        x, w = randn(1, 3, 5, 5), randn(4, 3, 3, 3)
        return (lambda: ops.conv2d_relu_forward(x, w, None, [1], [0, 0], 1)), None
    case("conv-raw-forward-one-element-stride", "stride", conv_raw_forward_bad_pair)
    del alexnet_ext


# --------------------------------------------------------------------------
# The worker: runs cases by name, one JSON line per result.

RESULT_PREFIX = "@@degenerate-result "


def _tolerance(dtype):
    import torch
    return {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6),
            torch.float16: dict(rtol=4e-3, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=1.5e-2)}.get(
                dtype, dict(rtol=0, atol=0))


def _compare(ours, ref):
    import torch
    ours = ours if isinstance(ours, tuple) else (ours,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    assert len(ours) == len(ref), f"{len(ours)} results, PyTorch gives {len(ref)}"
    for i, (o, r) in enumerate(zip(ours, ref)):
        assert tuple(o.shape) == tuple(r.shape), f"result {i}: shape {tuple(o.shape)}, PyTorch {tuple(r.shape)}"
        assert o.dtype == r.dtype, f"result {i}: dtype {o.dtype}, PyTorch {r.dtype}"
        torch.testing.assert_close(o.double(), r.double(), equal_nan=True, **_tolerance(o.dtype),
                                   msg=lambda m, i=i: f"result {i}: {m}")


def evaluate(name):
    """(passed, what happened) for one case."""
    import torch
    spec = CASES[name]
    torch.manual_seed(0)
    ours, ref = spec["build"]()
    ref_out, ref_err = None, "PyTorch has no counterpart"
    if ref is not None:
        try:
            ref_out, ref_err = ref(), None
        except Exception as e:  # noqa: BLE001 (any rejection by PyTorch counts)
            ref_err = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    try:
        out = ours()
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        first = msg.splitlines()[0][:300] if msg else ""
        if not isinstance(e, ACCEPTED_ERRORS):
            return False, f"raised {type(e).__name__} (not RuntimeError/ValueError/TypeError): {first}"
        if not re.search(rf"\b{re.escape(spec['arg'])}\b", msg):
            return False, f"the {type(e).__name__} does not name `{spec['arg']}`: {first}"
        if ref_err is None and not spec["limitation"]:
            return False, f"PyTorch accepts this input but we raised {type(e).__name__}: {first}"
        return True, f"raised {type(e).__name__}: {first}"
    if ref_err is not None:
        if spec["extension"] is None:
            return False, f"PyTorch rejects this input ({ref_err}) but we returned a result"
        spec["extension"](out)
        return True, "returned the documented empty result"
    if spec["limitation"]:
        return False, f"marked as a limitation ({spec['limitation']}) but we returned a result: update the case"
    _compare(out, ref_out)
    return True, "matches torch.nn.functional"


def worker_main():
    import resource
    # A hostile case must not take the shared machine's memory with it.
    limit = int(os.environ.get("DEGENERATE_WORKER_MEMORY", str(12 * 2**30)))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    import torch
    torch.set_num_threads(1)
    define_cases()
    torch.ops.alexnet_ext._set_poison_outputs(True)
    print(RESULT_PREFIX + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        name = line.strip()
        try:
            passed, detail = evaluate(name)
        except Exception as e:  # noqa: BLE001 (a failed comparison or check)
            passed, detail = False, f"{type(e).__name__}: {e}"
        print(RESULT_PREFIX + json.dumps({"name": name, "passed": passed, "detail": detail}), flush=True)


# --------------------------------------------------------------------------
# The pytest side.

class Worker:
    def __init__(self):
        self.proc = None

    def _start(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self._read(START_TIMEOUT_S)
        if ready is None or not ready.get("ready"):
            raise RuntimeError(f"degenerate-case worker did not start: {self._death()}")

    def _read(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            line = self.proc.stdout.readline()
            if not line:
                return None
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])

    def _death(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            return f"did not answer within {CASE_TIMEOUT_S} s (killed)"
        rc = self.proc.returncode
        return f"died with signal {-rc}" if rc < 0 else f"exited with status {rc}"

    def run(self, name):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        result = self._read(CASE_TIMEOUT_S)
        if result is None:
            why = self._death()
            self.proc = None
            return False, f"the process running the case {why}"
        return result["passed"], result["detail"]

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _case_names():
    import torch  # noqa: F401  (define_cases needs the operators)
    define_cases()
    return list(CASES)


CASE_NAMES = _case_names()


def test_at_least_sixty_cases():
    assert len(CASE_NAMES) >= 60


@pytest.mark.parametrize("name", CASE_NAMES)
def test_degenerate_case(worker, name):
    passed, detail = worker.run(name)
    assert passed, f"{name}: {detail}"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    worker_main()
