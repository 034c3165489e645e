"""Regression tests for the host-side defects of issue 9, one section each.

Calls that crashed the process before the fix run in a child interpreter
(run_isolated), so a regression fails the test instead of killing pytest.
"""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import alexnet_ext
from alexnet_ext.functional import max_pool2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ops = torch.ops.alexnet_ext


def run_isolated(code, env=None, timeout=300):
    """Runs `code` in a fresh interpreter (alexnet_ext imported, outputs
    poisoned) and returns its stdout; fails with its stderr and how it ended
    when it does not exit with status 0 (a signal means it crashed)."""
    prelude = ("import torch, torch.nn.functional as F, alexnet_ext\n"
               "from alexnet_ext.functional import max_pool2d\n"
               "ops = torch.ops.alexnet_ext\n"
               "ops._set_poison_outputs(True)\n")
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    assert proc.returncode == 0, f"child {how}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


# ---------------------------------------------------------------------------
# 1. max_pool2d with a zero height or width but a non-empty output (padding,
#    ceil_mode) read an empty input: a segmentation fault on the CPU.

def test_pool_zero_spatial_size_raises_naming_input():
    run_isolated("""
        import pytest
        for shape in [(1, 1, 0, 5), (1, 1, 5, 0), (2, 3, 0, 4), (0, 1, 0, 5)]:
            for cl in (False, True):
                x = torch.randn(shape)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last)
                with pytest.raises(RuntimeError, match="input"):
                    F.max_pool2d(x, 3, 2, 1, ceil_mode=True)  # PyTorch rejects it too
                for call in (lambda: max_pool2d(x, 3, 2, 1, True),
                             lambda: alexnet_ext.nn.MaxPool2d(3, 2, 1, ceil_mode=True)(x.requires_grad_()),
                             lambda: ops.max_pool2d_forward(x, [3, 3], [2, 2], [1, 1], True, True)):
                    with pytest.raises(RuntimeError, match="`input`.*non-zero height and width"):
                        call()
        # The backward operator, called directly with such an input size.
        dy, argmax = torch.randn(1, 1, 1, 3), torch.zeros(1, 1, 1, 3, dtype=torch.uint8)
        with pytest.raises(RuntimeError, match="`input_size`.*non-zero height and width"):
            ops.max_pool2d_backward(dy, argmax, [1, 1, 0, 5], [3, 3], [2, 2], [1, 1], True)
        with pytest.raises(RuntimeError, match="`input_size`.*non-negative"):
            ops.max_pool2d_backward(dy, argmax, [1, -1, 3, 5], [3, 3], [2, 2], [1, 1], True)
        # An empty batch (or no channels) with a real plane stays a valid, empty result.
        for shape in [(0, 3, 5, 5), (2, 0, 5, 5)]:
            y = max_pool2d(torch.randn(shape), 3, 2, 1, True)
            assert y.shape == shape[:2] + (3, 3)
        x = torch.randn(0, 3, 5, 5, requires_grad=True)
        max_pool2d(x, 3, 2, 1, True).sum().backward()
        assert x.grad.shape == x.shape
    """)


# ---------------------------------------------------------------------------
# 2. covering_outputs() computed (a + s - 1) / s in int: for strides near
#    INT_MAX it wrapped to a negative first output, and the backward gather
#    read the output row before the plane (for the second plane: the first
#    plane's last row, whose argmax matched, so gradients leaked between
#    planes).

@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kernel_size,stride,padding", [
    ((2, 4), (1, 2**31 - 1), (1, 2)),  # before the fix: wrong gradients on both layouts
    ((4, 4), (2**31 - 1, 2**31 - 1), (2, 2)),  # likewise
    ((3, 2), (2**31 - 1, 1), (1, 1)),
])
def test_pool_backward_with_strides_near_int_max(layout, kernel_size, stride, padding):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64)
    ours_x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.clone()
    ours_x.requires_grad_(True)
    ref_x = x.clone().requires_grad_(True)
    y = max_pool2d(ours_x, kernel_size, stride, padding, True)
    ref = F.max_pool2d(ref_x, kernel_size, stride, padding, ceil_mode=True)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(ref)
    (ours_grad,) = torch.autograd.grad(y, ours_x, g)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, g)
    torch.testing.assert_close(ours_grad, ref_grad)


# ---------------------------------------------------------------------------
# 3. The CPU backward scattered dy to delta[argmax]: a corrupted argmax (or a
#    direct call of the backward operator) wrote out of bounds.

def test_pool_backward_rejects_corrupted_argmax():
    run_isolated("""
        import pytest
        cases = [
            # (input size, kernel, stride, padding, argmax value, layout)
            ((2, 3, 9, 9), 3, 2, 0, 255, "contiguous"),      # scatter path, offset past the window
            ((2, 3, 9, 9), 3, 2, 0, 9, "channels_last"),
            ((1, 2, 9, 9), 3, 2, 1, 0, "contiguous"),        # inside the window but in the padding
            ((1, 2, 9, 9), 3, 2, 1, 0, "channels_last"),
            ((1, 2, 5, 5), 2, 1, 0, 200, "contiguous"),      # general gather paths
            ((1, 2, 5, 5), 2, 1, 0, 4, "channels_last"),
        ]
        for size, k, s, p, value, layout in cases:
            oh = (size[2] + 2 * p - k) // s + 1
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            dy = torch.randn(size[0], size[1], oh, oh).contiguous(memory_format=fmt)
            argmax = torch.full(dy.shape, value, dtype=torch.uint8).contiguous(memory_format=fmt)
            with pytest.raises(RuntimeError, match="`argmax`"):
                ops.max_pool2d_backward(dy, argmax, list(size), [k, k], [s, s], [p, p], False)
        # int32 offsets (windows over 256 elements): negative values.
        dy = torch.randn(1, 1, 2, 2)
        argmax = torch.full((1, 1, 2, 2), -5, dtype=torch.int32)
        with pytest.raises(RuntimeError, match="`argmax`"):
            ops.max_pool2d_backward(dy, argmax, [1, 1, 34, 34], [17, 17], [16, 16], [0, 0], False)
        # The argmax a forward saved is accepted, and matches PyTorch.
        x = torch.randn(2, 3, 9, 9, dtype=torch.float64, requires_grad=True)
        y, argmax = ops.max_pool2d_forward(x, [3, 3], [2, 2], [1, 1], True, True)
        dy = torch.randn_like(y)
        dx = ops.max_pool2d_backward(dy, argmax, list(x.shape), [3, 3], [2, 2], [1, 1], True)
        (ref,) = torch.autograd.grad(F.max_pool2d(x, 3, 2, 1, ceil_mode=True), x, dy)
        torch.testing.assert_close(dx, ref)
    """)


# ---------------------------------------------------------------------------
# 4. conv2d_relu read the TF32 switch with the no-argument allowTF32CuDNN(),
#    which throws once torch.backends.cudnn.conv.fp32_precision is set (so
#    every CUDA conv raised). The op now reads the convolution setting, and
#    only for float32.

@pytest.fixture
def restore_fp32_precision():
    cudnn = torch.backends.cudnn
    saved = (cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision)
    try:
        legacy = cudnn.allow_tf32  # raises if conv and RNN already differ
    except RuntimeError:
        legacy = None
    yield
    if legacy is not None:
        # First: the legacy setter also sets conv and RNN; leaving its flag
        # stale would make every later no-argument query raise.
        cudnn.allow_tf32 = legacy
    cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved
    if legacy is not None:
        assert cudnn.allow_tf32 == legacy


def uses_tf32(dtype):
    return ops._conv2d_relu_uses_tf32(dtype)


def test_conv_tf32_follows_the_legacy_switch(restore_fp32_precision):
    torch.backends.cudnn.allow_tf32 = True
    assert uses_tf32(torch.float32)
    assert not uses_tf32(torch.float16) and not uses_tf32(torch.float64) and not uses_tf32(torch.bfloat16)
    torch.backends.cudnn.allow_tf32 = False
    assert not uses_tf32(torch.float32)


def test_conv_tf32_follows_the_per_op_precision_api(restore_fp32_precision):
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    # The no-argument query the op used to make now throws (conv and RNN differ).
    with pytest.raises(RuntimeError, match="TF32"):
        torch.backends.cudnn.allow_tf32
    assert not uses_tf32(torch.float32)
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    torch.backends.cudnn.rnn.fp32_precision = "ieee"
    assert uses_tf32(torch.float32)
    assert not uses_tf32(torch.float16)


# ---------------------------------------------------------------------------
# 5. The default TORCH_CUDA_ARCH_LIST embedded no PTX: GPUs newer than Hopper
#    found no kernel image.

def load_setup_module():
    spec = importlib.util.spec_from_file_location("alexnet_ext_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds nothing: setup() only runs as __main__
    return module


def test_default_cuda_archs_embed_ptx(monkeypatch, capsys):
    setup_module = load_setup_module()
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.delenv("USE_CUDA", raising=False)
    monkeypatch.delenv("FORCE_CUDA", raising=False)
    monkeypatch.setattr(setup_module.torch.version, "cuda", "13.0")
    monkeypatch.setattr(setup_module, "_nvcc_path", lambda: "/usr/local/cuda/bin/nvcc")
    cfg = setup_module.resolve_config()
    assert cfg["with_cuda"] and cfg["cuda_archs"] == "8.0;9.0+PTX"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"  # what torch's cpp_extension reads
    setup_module.print_config(cfg)
    printed = capsys.readouterr().out
    assert "8.0;9.0+PTX" in printed and "default" in printed
    # A list without +PTX is kept (the user asked for it), with a warning in the config.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    cfg = setup_module.resolve_config()
    assert cfg["cuda_archs"] == "9.0" and "no kernel image" in cfg["cuda_archs_from"]


# ---------------------------------------------------------------------------
# 6. Launch errors were only checked with cudaGetLastError, so a fault inside
#    a kernel was blamed on a later call. ALEXNET_EXT_SYNC_CHECK=1 makes every
#    launch synchronous and names the op and the kernel. The synchronisation
#    itself needs a GPU (and runs under the SIMT emulator); the setting and
#    the error are checked here.

@pytest.mark.parametrize("value,enabled", [(None, False), ("", False), ("0", False), ("1", True), ("true", True),
                                           ("off", False)])
def test_sync_check_setting_is_read_from_the_environment(value, enabled):
    env = {"ALEXNET_EXT_SYNC_CHECK": value} if value is not None else {}
    code = "import os\nos.environ.pop('ALEXNET_EXT_SYNC_CHECK', None)\n" if value is None else ""
    out = run_isolated(code + "print(ops._sync_check_enabled())\n", env=env)
    assert out.strip() == str(enabled)


def test_sync_check_setting_is_read_once():
    out = run_isolated("""
        import os
        first = ops._sync_check_enabled()
        os.environ["ALEXNET_EXT_SYNC_CHECK"] = "0"
        print(first, ops._sync_check_enabled())
    """, env={"ALEXNET_EXT_SYNC_CHECK": "1"})
    assert out.split() == ["True", "True"]


def test_launch_error_names_op_and_kernel():
    with pytest.raises(RuntimeError) as info:
        ops._check_launch(700, "alexnet_ext.max_pool2d backward", "max_pool2d_backward_cuda")
    msg = str(info.value)
    assert "alexnet_ext.max_pool2d backward" in msg and "max_pool2d_backward_cuda" in msg
    assert "ALEXNET_EXT_SYNC_CHECK=1" in msg  # how to pin an earlier kernel's fault on it
    ops._check_launch(0, "alexnet_ext.max_pool2d", "max_pool2d_forward_cuda")  # success: no error
