"""AlexNet built from our operators: structure, parameter counts, activation
shapes, initialisation, the LRN alpha convention, ablations, summary() and
torch.compile, checked against an independent torch.nn.functional network."""
import math

import pytest
import torch
import torch.nn.functional as F

import alexnet_ext
from alexnet_ext.models import AlexNet, summary
from op_testing import tolerance


def reference_alexnet(model: AlexNet, x, lrn_alpha=1e-4 * 5, activation="relu", lrn=True, pool_kernel=3):
    """The 2012 network written with torch.nn.functional on one device, as a
    grouped network: the columns become groups=2 convolutions (conv2, conv4,
    conv5) and concatenated weights (conv1, conv3, fc*), LRN normalises
    within each column's channels. Weights are taken from `model`; the
    hyper-parameters are given here, in PyTorch's LRN convention."""
    cols, groups = model.columns, model.num_columns
    act = F.relu if activation == "relu" else torch.tanh

    def weights(layer):
        w = torch.cat([getattr(c, layer).weight for c in cols])
        b = torch.cat([getattr(c, layer).bias for c in cols])
        return w, b

    def conv(x, layer, stride, padding, grouped):
        w, b = weights(layer)
        return act(F.conv2d(x, w, b, stride=stride, padding=padding, groups=groups if grouped else 1))

    def norm(x):  # each column normalises its own channels only
        if not lrn:
            return x
        return torch.cat([F.local_response_norm(p, 5, alpha=lrn_alpha, beta=0.75, k=2.0)
                          for p in x.chunk(groups, dim=1)], dim=1)

    pool = lambda x: F.max_pool2d(x, pool_kernel, 2)
    x = pool(norm(conv(x, "conv1", 4, 2, False)))
    x = pool(norm(conv(x, "conv2", 1, 2, True)))
    x = conv(x, "conv3", 1, 1, False)
    x = conv(x, "conv4", 1, 1, True)
    x = pool(conv(x, "conv5", 1, 1, True))
    x = act(F.linear(torch.flatten(x, 1), *weights("fc6")))
    x = act(F.linear(x, *weights("fc7")))
    return F.linear(x, model.fc8.weight, model.fc8.bias)


def small_model(dtype=torch.float64, **kwargs):
    """A model for 67x67 inputs (1x1 features: fc6 has 256 inputs); dropout
    off so runs are deterministic; PyTorch init so activations are not tiny."""
    kwargs = dict(dict(num_classes=10, dropout=0.0, input_size=67, init="default"), **kwargs)
    return AlexNet(**kwargs).to(dtype)


def param_count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("columns, expected", [(2, 60_965_224), (1, 62_378_344)])
def test_parameter_count_matches_paper(columns, expected):
    assert param_count(AlexNet(columns=columns)) == expected


def is_fused(model):
    return isinstance(model.columns[0].norm1, alexnet_ext.nn.LocalResponseNormMaxPool2d)


def expected_shapes(columns, n=1, fused=True):
    """Per-layer activation shapes of the 224x224 network, from the paper."""
    g = columns
    # Fused: norm1/norm2 are the LRN + max-pool (their output is pooled),
    # pool1/pool2 the Identity left in the pools' place.
    norm1, norm2 = ((27, 27), (13, 13)) if fused else ((55, 55), (27, 27))
    per_column = {
        "conv1": (n, 96 // g, 55, 55), "norm1": (n, 96 // g, *norm1), "pool1": (n, 96 // g, 27, 27),
        "conv2": (n, 256 // g, 27, 27), "norm2": (n, 256 // g, *norm2), "pool2": (n, 256 // g, 13, 13),
        "conv3": (n, 384 // g, 13, 13), "conv4": (n, 384 // g, 13, 13), "conv5": (n, 256 // g, 13, 13),
        "pool5": (n, 256 // g, 6, 6), "drop6": (n, 9216 // g),
        "fc6": (n, 4096 // g), "act6": (n, 4096 // g), "drop7": (n, 4096 // g),
        "fc7": (n, 4096 // g), "act7": (n, 4096 // g),
    }
    shapes = {f"columns.{c}.{k}": v for c in range(columns) for k, v in per_column.items()}
    shapes["fc8"] = (n, 1000)
    return shapes


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("columns", [2, 1])
def test_every_activation_shape_at_224(columns, fused):
    model = AlexNet(columns=columns, fuse_lrn_pool=fused).eval()
    seen = {}
    for name, m in model.named_modules():
        if name and not list(m.children()):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert seen == expected_shapes(columns, fused=fused)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("columns", [2, 1])
def test_summary_table(columns, capsys):
    model = AlexNet(columns=columns)
    text = summary(model)
    assert capsys.readouterr().out.strip() == text.strip()
    total = alexnet_ext.models.PAPER_PARAMETERS[columns]
    assert f"Total params: {total:,}" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith(("columns.", "fc8"))}
    assert set(rows) == set(expected_shapes(columns))
    for name, shape in expected_shapes(columns, fused=is_fused(model)).items():
        assert str(shape) in rows[name]
    # The per-row parameter column adds up to the total.
    assert sum(int(line.split()[-1].replace(",", "")) for line in rows.values()) == total
    # Weights and biases of one layer, e.g. conv1 of column 0.
    conv1 = model.columns[0].conv1
    assert rows["columns.0.conv1"].split()[-3:] == [f"{conv1.weight.numel():,}", f"{conv1.bias.numel():,}",
                                                    f"{conv1.weight.numel() + conv1.bias.numel():,}"]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("columns", [2, 1])
def test_forward_and_backward_match_functional_reference(columns, fused):
    model = small_model(columns=columns, fuse_lrn_pool=fused)
    x = torch.randn(2, 3, 67, 67, dtype=torch.float64, requires_grad=True)
    out = model(x)
    ref = reference_alexnet(model, x)
    tol = tolerance(torch.float64, 100)
    torch.testing.assert_close(out, ref, **tol)
    upstream = torch.randn_like(out)
    params = [x, model.columns[-1].conv2.weight, model.columns[0].conv3.weight, model.columns[0].fc6.bias]
    got = torch.autograd.grad(out, params, upstream)
    want = torch.autograd.grad(ref, params, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("activation, lrn, pool_kernel", [("tanh", True, 3), ("relu", False, 3), ("relu", True, 2)])
def test_ablations_match_reference(activation, lrn, pool_kernel, fused):
    model = small_model(activation=activation, lrn=lrn, pool_kernel=pool_kernel, fuse_lrn_pool=fused)
    modules = list(model.modules())
    assert any(isinstance(m, torch.nn.Tanh) for m in modules) == (activation == "tanh")
    assert any(isinstance(m, alexnet_ext.nn.Conv2dReLU) for m in modules) == (activation == "relu")
    fuses = [m for m in modules if isinstance(m, alexnet_ext.nn.LocalResponseNormMaxPool2d)]
    assert len(fuses) == (4 if lrn and fused else 0) and all(m.kernel_size == pool_kernel for m in fuses)
    lrns = [m for m in modules if isinstance(m, alexnet_ext.nn.LocalResponseNorm)]
    assert len(lrns) == (4 if lrn and not fused else 0)
    pools = [m for m in modules if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == (2 if lrn and fused else 6)
    assert all(isinstance(m, alexnet_ext.nn.MaxPool2d) and m.kernel_size == pool_kernel for m in pools)
    # 67x67: conv1 16x16, then 3/2 pools give 7, 3, 1 and 2/2 pools give 8, 4, 2.
    assert model.columns[0].fc6.in_features == 256 * (1 if pool_kernel == 3 else 2) ** 2
    x = torch.randn(2, 3, 67, 67, dtype=torch.float64)
    ref = reference_alexnet(model, x, activation=activation, lrn=lrn, pool_kernel=pool_kernel)
    torch.testing.assert_close(model(x), ref, **tolerance(torch.float64, 100))


def test_lrn_alpha_conventions():
    """Paper: b = a / (k + alpha * sum a^2)^beta; PyTorch divides alpha by the window."""
    paper = small_model(lrn_alpha=1e-2, fuse_lrn_pool=True)
    torch_conv = small_model(lrn_alpha=1e-2, lrn_alpha_convention="pytorch", fuse_lrn_pool=True)
    a = torch.randn(2, 8, 3, 3, dtype=torch.float64) * 3
    # The paper's formula, written out: window of 5 centred on each channel.
    sq = F.pad(a * a, (0, 0, 0, 0, 2, 2))
    window = sum(sq[:, i:i + 8] for i in range(5))
    by_hand = a / (2.0 + 1e-2 * window) ** 0.75
    pool = lambda t: F.max_pool2d(t, 3, 2)  # noqa: E731  (norm1 is LRN + pool1's max-pool)
    torch.testing.assert_close(paper.columns[0].norm1(a), pool(by_hand))
    torch.testing.assert_close(torch_conv.columns[0].norm1(a), pool(a / (2.0 + 1e-2 / 5 * window) ** 0.75))
    assert paper.columns[1].norm2.alpha == pytest.approx(5e-2)


def test_paper_initialisation():
    model = AlexNet(columns=2)
    for name, p in model.named_parameters():
        layer, kind = name.split(".")[-2:]
        if kind == "bias":
            want = 1.0 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
            assert torch.all(p == want), name
        else:
            # N(0, 0.01^2): the sample std of >= 17k draws is within 4% of 0.01.
            assert abs(p.std().item() - 0.01) < 4e-4, name
            assert abs(p.mean().item()) < 4 * 0.01 / math.sqrt(p.numel()) + 1e-6, name


def test_default_initialisation_is_pytorchs():
    model = AlexNet(columns=2, init="default")
    for layer in (model.columns[0].conv1, model.columns[1].fc6, model.fc8):
        fan_in = layer.weight[0].numel()
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) and the bias both use it
        assert layer.weight.abs().max() <= bound
        assert abs(layer.weight.std().item() - bound / math.sqrt(3)) < 0.05 * bound
        assert layer.bias.abs().max() <= bound and layer.bias.std() > 0


def test_compile_fullgraph_matches_eager():
    """Inductor (the default backend) compiles the whole forward in one
    graph; the backward through our operators' autograd formulas is traced
    with aot_eager (the same graph capture, without Inductor's C++ build,
    which takes most of a minute on a small CPU)."""
    model = small_model(dtype=torch.float32)
    x = torch.randn(2, 3, 67, 67)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x),
                                   **tolerance(torch.float32, 10))
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(out, model(x), **tolerance(torch.float32, 10))
    params = [model.columns[1].conv4.weight, model.columns[0].conv1.bias, model.fc8.weight]
    grads = torch.autograd.grad(out.square().sum(), params)
    want = torch.autograd.grad(model(x).square().sum(), params)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, **tolerance(torch.float32, 100))


def test_dropout_masks_are_shared_by_columns():
    """Dropout acts on each column's own outputs before they cross, so both
    columns' fc6 see the same dropped input: in training mode the model
    still equals the reference run on identically dropped activations."""
    model = small_model(dropout=0.5).train()
    seen = []
    model.columns[0].fc6.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model.columns[1].fc6.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    model(torch.randn(2, 3, 67, 67, dtype=torch.float64))
    assert torch.equal(seen[0], seen[1])
    assert (seen[0] == 0).any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(columns=3), "columns"), (dict(num_classes=0), "num_classes"), (dict(dropout=1.0), "dropout"),
    (dict(activation="gelu"), "activation"), (dict(pool_kernel=4), "pool_kernel"), (dict(init="xavier"), "init"),
    (dict(lrn_alpha_convention="caffe"), "lrn_alpha_convention"), (dict(input_size=40), "input_size"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlexNet(**kwargs)


def test_bad_input_shape():
    model = small_model()
    with pytest.raises(ValueError, match="input_size"):
        model(torch.randn(1, 3, 70, 70, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(torch.randn(1, 1, 67, 67, dtype=torch.float64))
