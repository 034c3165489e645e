"""AlexNet (Krizhevsky, Sutskever & Hinton, 2012) built from alexnet_ext's operators.

    model = alexnet_ext.models.AlexNet(num_classes=1000)          # the paper's two columns
    alexnet_ext.models.summary(model)                               # Keras-style table
    model = alexnet_ext.parallel.ColumnParallel(model, ["cuda:0", "cuda:1"])
"""
from typing import List, Sequence

import torch
from torch import nn

from . import nn as ann
from .parallel import ColumnPlacement

__all__ = ["AlexNet", "summary", "PAPER_PARAMETERS"]

# Parameter counts of the 224x224, 1000-class network (asserted by the tests).
PAPER_PARAMETERS = {2: 60_965_224, 1: 62_378_344}

_CONV = [  # name, total out channels, kernel, stride, padding
    ("conv1", 96, 11, 4, 2),
    ("conv2", 256, 5, 1, 2),
    ("conv3", 384, 3, 1, 1),
    ("conv4", 384, 3, 1, 1),
    ("conv5", 256, 3, 1, 1),
]
_FC = 4096
# The paper initialises these biases to 1 ("accelerates the early stages of
# learning by providing the ReLUs with positive inputs"), all others to 0.
_BIAS_ONE = ("conv2", "conv4", "conv5", "fc6", "fc7")


class Conv2dTanh(nn.Conv2d):
    """A plain convolution followed by tanh (the paper's saturating baseline).
    Same parameters and state_dict keys as Conv2dReLU."""

    def forward(self, input):
        return torch.tanh(super().forward(input))


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class Column(nn.Module):
    """One column of the network: its share of every layer but fc8.

    With two columns, a column's conv2, conv4 and conv5 see only that column's
    channels (the paper's groups=2); conv3 and fc6/fc7 see the outputs of all
    columns, handed over by the model at the crossings.
    """

    def __init__(self, columns, activation, lrn, lrn_args, pool_kernel, dropout, flat_features, fuse_lrn_pool):
        super().__init__()
        conv = ann.Conv2dReLU if activation == "relu" else Conv2dTanh
        out = {name: channels // columns for name, channels, *_ in _CONV}
        ins = {"conv1": 3, "conv2": out["conv1"], "conv3": out["conv2"] * columns,
               "conv4": out["conv3"], "conv5": out["conv4"]}
        for name, _, kernel, stride, padding in _CONV:
            setattr(self, name, conv(ins[name], out[name], kernel, stride=stride, padding=padding))
        # LRN is always followed by a pool: with LRN and fuse_lrn_pool,
        # norm1/norm2 are the fused LRN + max-pool operator (the LRN output,
        # the largest activation, is never written) and pool1/pool2 are
        # Identity, so the layer names (and state_dict keys: none of these has
        # parameters) stay put either way.
        pool = lambda: ann.MaxPool2d(pool_kernel, stride=2)  # noqa: E731
        for norm_name, pool_name in (("norm1", "pool1"), ("norm2", "pool2")):
            if lrn and not fuse_lrn_pool:
                setattr(self, norm_name, ann.LocalResponseNorm(*lrn_args))
                setattr(self, pool_name, pool())
            elif lrn:
                setattr(self, norm_name, ann.LocalResponseNormMaxPool2d(*lrn_args, kernel_size=pool_kernel, stride=2))
                setattr(self, pool_name, nn.Identity())
            else:
                setattr(self, norm_name, nn.Identity())
                setattr(self, pool_name, pool())
        self.pool5 = pool()
        act = nn.ReLU if activation == "relu" else nn.Tanh
        self.drop6 = nn.Dropout(dropout)
        self.fc6 = nn.Linear(flat_features, _FC // columns)
        self.act6 = act()
        self.drop7 = nn.Dropout(dropout)
        self.fc7 = nn.Linear(_FC, _FC // columns)
        self.act7 = act()

    # The stages between crossings. Dropout is applied to a column's own
    # outputs before they cross, so that every column sees the same mask.
    def features(self, x):            # -> conv3's input (this column's share)
        x = self.pool1(self.norm1(self.conv1(x)))
        return self.pool2(self.norm2(self.conv2(x)))

    def convs(self, x):               # conv3's whole input -> fc6's input share
        x = self.pool5(self.conv5(self.conv4(self.conv3(x))))
        return self.drop6(torch.flatten(x, 1))

    def fc6_stage(self, x):           # fc6's whole input -> fc7's input share
        return self.drop7(self.act6(self.fc6(x)))

    def fc7_stage(self, x):           # fc7's whole input -> fc8's input share
        return self.act7(self.fc7(x))


class AlexNet(nn.Module):
    """The network of the 2012 paper, built from alexnet_ext's operators.

    ``AlexNet(num_classes=1000, columns=2, dropout=0.5, lrn_size=5,
    lrn_alpha=1e-4, lrn_beta=0.75, lrn_k=2.0, init="paper",
    activation="relu", lrn=True, pool_kernel=3, input_size=224,
    lrn_alpha_convention="paper", fuse_lrn_pool=True)``

    conv1 96 11x11/4 pad 2 (224 -> 55), ReLU, LRN, max-pool 3/2; conv2 256
    5x5 pad 2, ReLU, LRN, pool; conv3 384, conv4 384, conv5 256 (3x3 pad 1,
    ReLU), pool; dropout, fc6 4096, ReLU, dropout, fc7 4096, ReLU, fc8.
    Convolutions with ReLU are our fused ``Conv2dReLU``. With
    ``fuse_lrn_pool=True`` each LRN and the pool after it are one
    ``LocalResponseNormMaxPool2d`` (as ``norm1`` / ``norm2``, with ``pool1`` /
    ``pool2`` left as ``Identity``); with ``False`` they are our
    ``LocalResponseNorm`` and ``MaxPool2d``, as separate layers (same
    results and state_dict keys). pool5 is our ``MaxPool2d``.

    ``columns=2`` (60,965,224 parameters): the paper's two columns, as
    ``self.columns[0]`` and ``self.columns[1]``, each with half of every
    layer's kernels (48/128/192/192/128) and half of fc6 and fc7 (2048
    outputs). conv2, conv4 and conv5 see only their own column's channels;
    conv3, fc6 and fc7 see both columns' outputs; fc8 (``self.fc8``) is one
    layer fed by both columns. ``columns=1`` (62,378,344 parameters): every
    layer sees all channels. The columns exchange activations only at
    conv3's, fc6's, fc7's and fc8's inputs, through ``self.placement``; see
    :mod:`alexnet_ext.parallel` to put each column on its own device.

    LRN alpha: the paper computes ``k + alpha * sum(a^2)`` over the window,
    PyTorch/Caffe/cuda-convnet2 ``k + alpha/size * sum(a^2)``. The defaults
    follow the paper (``lrn_alpha_convention="paper"``, alpha = 1e-4 not
    divided, so our PyTorch-convention ``LocalResponseNorm`` is given
    ``alpha = 1e-4 * lrn_size``). Pass ``lrn_alpha_convention="pytorch"`` to
    give ``lrn_alpha`` in the divided convention instead (Caffe's
    ``bvlc_alexnet`` is ``lrn_alpha=1e-4, lrn_alpha_convention="pytorch"``).

    Ablations of the paper's choices: ``activation="tanh"`` (plain
    convolution then tanh, and tanh after fc6/fc7), ``lrn=False``,
    ``pool_kernel=2`` (2x2 stride 2 non-overlapping pooling).

    ``init="paper"``: weights from N(0, 0.01^2), biases 1 in conv2, conv4,
    conv5, fc6, fc7 and 0 elsewhere; ``init="default"``: PyTorch's defaults.

    ``input_size`` (default 224) is the height and width the model is built
    for: fc6's input size follows from it (a smaller one, e.g. 67, gives a
    cheap model for tests; the parameter counts above hold for 224).
    """

    def __init__(self, num_classes: int = 1000, columns: int = 2, dropout: float = 0.5,
                 lrn_size: int = 5, lrn_alpha: float = 1e-4, lrn_beta: float = 0.75,
                 lrn_k: float = 2.0, init: str = "paper", activation: str = "relu",
                 lrn: bool = True, pool_kernel: int = 3, input_size: int = 224,
                 lrn_alpha_convention: str = "paper", fuse_lrn_pool: bool = True):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"AlexNet: `num_classes` must be a positive integer, got {num_classes}")
        if columns not in (1, 2):
            raise ValueError(f"AlexNet: `columns` must be 1 or 2, got {columns}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AlexNet: `dropout` must be in [0, 1), got {dropout}")
        if activation not in ("relu", "tanh"):
            raise ValueError(f"AlexNet: `activation` must be 'relu' or 'tanh', got {activation!r}")
        if pool_kernel not in (2, 3):
            raise ValueError(f"AlexNet: `pool_kernel` must be 3 (overlapping) or 2, got {pool_kernel}")
        if init not in ("paper", "default"):
            raise ValueError(f"AlexNet: `init` must be 'paper' or 'default', got {init!r}")
        if lrn_alpha_convention not in ("paper", "pytorch"):
            raise ValueError("AlexNet: `lrn_alpha_convention` must be 'paper' or 'pytorch', "
                             f"got {lrn_alpha_convention!r}")
        self.num_classes, self.num_columns = int(num_classes), columns
        self.input_size = int(input_size)
        self.feature_size = self._feature_size(self.input_size, pool_kernel)
        flat = 256 * self.feature_size ** 2
        alpha = lrn_alpha * lrn_size if lrn_alpha_convention == "paper" else lrn_alpha
        lrn_args = (lrn_size, alpha, lrn_beta, lrn_k)
        self.columns = nn.ModuleList(
            Column(columns, activation, lrn, lrn_args, pool_kernel, dropout, flat, fuse_lrn_pool)
            for _ in range(columns))
        self.fc8 = nn.Linear(_FC, self.num_classes)
        # Every model starts unplaced (devices=None: it runs where it is);
        # ColumnParallel gives it a device per column.
        self.placement = ColumnPlacement(columns)
        if init == "paper":
            self.reset_parameters_paper()

    @staticmethod
    def _feature_size(size: int, pool_kernel: int) -> int:
        s = size
        for name, _, kernel, stride, padding in _CONV:
            s = _conv_out(s, kernel, stride, padding)
            if name in ("conv1", "conv2", "conv5"):
                s = _conv_out(s, pool_kernel, 2, 0)
        if s < 1:
            raise ValueError(f"AlexNet: `input_size` {size} is too small: the features shrink to nothing "
                             "(at least 63 is needed)")
        return s

    def reset_parameters_paper(self):
        """The paper's initialisation: N(0, 0.01^2) weights; biases 1 in
        conv2, conv4, conv5, fc6, fc7 and 0 elsewhere."""
        with torch.no_grad():
            for name, m in self.named_modules():
                if isinstance(m, (nn.Conv2d, nn.Linear)):
                    m.weight.normal_(0.0, 0.01)
                    if m.bias is not None:
                        m.bias.fill_(1.0 if name.rsplit(".", 1)[-1] in _BIAS_ONE else 0.0)

    def column_modules(self) -> List[List[nn.Module]]:
        """The modules each column's device holds: column 0 also holds fc8."""
        return [[col] + ([self.fc8] if c == 0 else []) for c, col in enumerate(self.columns)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"AlexNet: input must be (N, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(f"AlexNet: input must be {self.input_size}x{self.input_size} (the model's "
                             f"`input_size`), got {tuple(x.shape[-2:])}")
        p, cols = self.placement, range(self.num_columns)
        p.begin()
        outs = []
        for c in cols:
            with p.on(c):
                outs.append(self.columns[c].features(p.enter(x, c)))
        for stage, name in (("convs", "conv3"), ("fc6_stage", "fc6"), ("fc7_stage", "fc7")):
            ins = []
            for c in cols:  # all copies first, so they overlap the next stage's compute
                with p.on(c):
                    ins.append(p.gather(outs, c, name))
            outs = []
            for c in cols:
                with p.on(c):
                    outs.append(getattr(self.columns[c], stage)(ins[c]))
        with p.on(0):
            logits = self.fc8(p.gather(outs, 0, "fc8"))
        return p.finish(logits, 0)  # outside on(0): the caller's stream waits


def _count(params: Sequence[torch.nn.Parameter]) -> int:
    return sum(t.numel() for t in params)


def summary(model: nn.Module, input_size=(3, 224, 224), batch_size: int = 1, print_fn=print) -> str:
    """Print (and return) a table of every layer of ``model``: output shape,
    weights, biases and parameters, with totals, like Keras' model.summary().

    The forward runs on the meta device (shapes only, no compute), so it is
    instant even for the full network; ``model`` itself is not changed.
    """
    import copy
    while isinstance(getattr(model, "module", None), nn.Module):  # ColumnParallel, DDP
        model = model.module
    # Copied unplaced (CUDA streams are not copied) and shape-only.
    memo = {id(model.placement): ColumnPlacement(model.num_columns)} if isinstance(model, AlexNet) else {}
    meta_model = copy.deepcopy(model, memo).to("meta")
    rows, hooks = [], []
    for name, m in meta_model.named_modules():
        if name and not list(m.children()):
            def hook(mod, inp, out, name=name):
                w = _count([p for n, p in mod.named_parameters(recurse=False) if n == "weight"])
                b = _count([p for n, p in mod.named_parameters(recurse=False) if n == "bias"])
                rows.append((name, type(mod).__name__, tuple(out.shape), w, b))
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            meta_model.eval()(torch.empty((batch_size, *input_size), device="meta"))
    finally:
        for h in hooks:
            h.remove()
    header = ("Layer (type)", "Output shape", "Weights", "Biases", "Param #")
    body = [(f"{n} ({t})", str(s), f"{w:,}", f"{b:,}", f"{w + b:,}") for n, t, s, w, b in rows]
    widths = [max(len(r[i]) for r in [header] + body) for i in range(5)]
    fmt = lambda r: "  ".join(r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(5))
    total = _count(list(meta_model.parameters()))
    trainable = _count([p for p in meta_model.parameters() if p.requires_grad])
    rule = "=" * len(fmt(header))
    lines = [rule, fmt(header), rule, *map(fmt, body), rule,
             f"Total params: {total:,}", f"Trainable params: {trainable:,}",
             f"Non-trainable params: {total - trainable:,}", rule]
    text = "\n".join(lines)
    if print_fn is not None:
        print_fn(text)
    return text
