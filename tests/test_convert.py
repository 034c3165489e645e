"""alexnet_ext.convert(module): torch.nn layers replaced by ours in an
existing model, weights and state_dict keys preserved, outputs unchanged."""
import copy

import pytest
import torch
from torch import nn

import alexnet_ext
from op_testing import tolerance


class TorchvisionStyleAlexNet(nn.Module):
    """AlexNet as torchvision defines it (one column, no LRN), written here
    with plain torch.nn so that convert() has a real-world target."""

    def __init__(self, num_classes=1000, dropout=0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
            nn.Dropout(p=dropout), nn.Linear(4096, 4096), nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def caffe_style_net():
    """Plain torch.nn with LRN, grouped and strided convolutions, nesting, and
    layers that must NOT be touched."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=2, padding=2), nn.ReLU(),
        nn.LocalResponseNorm(5, alpha=1e-3, beta=0.75, k=2.0),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(inplace=True)),
        nn.Conv2d(8, 8, 3, padding=1), nn.Tanh(),              # not followed by ReLU: kept
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU(),  # dilated: kept
        nn.MaxPool2d(2, stride=1, dilation=2),                  # dilated pool: kept
        nn.Conv2d(8, 4, 1, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 5),
    )


def check_converted(model, x):
    """convert() keeps parameters (the same objects), keys and outputs."""
    model = model.double().eval()
    before_params = dict(model.named_parameters())
    before_keys = list(model.state_dict())
    x = x.double().requires_grad_(True)
    want = model(x)
    upstream = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x] + list(before_params.values()), upstream)
    original = copy.deepcopy(model)
    converted = alexnet_ext.convert(model)
    assert converted is model
    assert list(converted.state_dict()) == before_keys
    assert all(p is before_params[n] for n, p in converted.named_parameters())
    assert not converted.training
    got = converted(x)
    torch.testing.assert_close(got, want, **tolerance(torch.float64, 100))
    got_grads = torch.autograd.grad(got, [x] + list(before_params.values()), upstream)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, **tolerance(torch.float64, 100))
    return original, converted


def test_torchvision_style_alexnet():
    original, model = check_converted(TorchvisionStyleAlexNet(num_classes=10), torch.randn(2, 3, 67, 67))
    types = [type(m) for m in model.features]
    assert types == [alexnet_ext.nn.Conv2dReLU, nn.Identity, alexnet_ext.nn.MaxPool2d] * 2 + \
        [alexnet_ext.nn.Conv2dReLU, nn.Identity] * 3 + [alexnet_ext.nn.MaxPool2d]
    # The classifier has no conv, pool or LRN: untouched.
    assert [type(m) for m in model.classifier] == [type(m) for m in original.classifier]
    conv = model.features[3]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (64, 192, (5, 5), (2, 2))


def test_caffe_style_net_with_lrn_and_exclusions():
    _, model = check_converted(caffe_style_net(), torch.randn(2, 3, 15, 15))
    assert type(model[0]) is alexnet_ext.nn.Conv2dReLU and type(model[1]) is nn.Identity
    # LRN directly followed by a pool: one fused layer, the pool's slot Identity.
    fused = model[2]
    assert type(fused) is alexnet_ext.nn.LocalResponseNormMaxPool2d and type(model[3]) is nn.Identity
    assert (fused.size, fused.alpha, fused.beta, fused.k) == (5, 1e-3, 0.75, 2.0)
    assert (fused.kernel_size, fused.stride, fused.padding, fused.ceil_mode) == (3, 2, 0, True)
    assert type(model[4][0]) is alexnet_ext.nn.Conv2dReLU and model[4][0].groups == 2
    assert type(model[5]) is nn.Conv2d and type(model[6]) is nn.Tanh
    assert type(model[7]) is nn.Conv2d and type(model[8]) is nn.ReLU
    assert type(model[9]) is nn.MaxPool2d
    assert type(model[10]) is alexnet_ext.nn.Conv2dReLU and model[10].bias is None


@pytest.mark.parametrize("pool, fused", [
    (nn.MaxPool2d(3, stride=2, padding=1), True),
    (nn.MaxPool2d(2), True),
    (nn.MaxPool2d(3, stride=2, dilation=2), False),  # dilated: LRN converted alone, pool kept
])
def test_lrn_followed_by_pool_is_fused(pool, fused):
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.LocalResponseNorm(3, alpha=1e-2, k=1.5), pool)
    _, converted = check_converted(model, torch.randn(2, 3, 13, 13))
    if fused:
        assert type(converted[1]) is alexnet_ext.nn.LocalResponseNormMaxPool2d and type(converted[2]) is nn.Identity
    else:
        assert type(converted[1]) is alexnet_ext.nn.LocalResponseNorm


def test_lrn_not_followed_by_a_plain_pool_is_not_fused():
    model = nn.Sequential(nn.LocalResponseNorm(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.LocalResponseNorm(3), nn.MaxPool2d(2, return_indices=True))
    alexnet_ext.convert(model)
    assert [type(m) for m in model] == [alexnet_ext.nn.LocalResponseNorm, nn.ReLU, alexnet_ext.nn.MaxPool2d,
                                        alexnet_ext.nn.LocalResponseNorm, alexnet_ext.nn.MaxPool2d]
    assert model[4].return_indices


def test_training_mode_and_root_layers():
    lrn = nn.LocalResponseNorm(3, k=1.5).train()
    new = alexnet_ext.convert(lrn)
    assert type(new) is alexnet_ext.nn.LocalResponseNorm and new.training and new.k == 1.5
    pool = alexnet_ext.convert(nn.MaxPool2d(3, 2, padding=1).eval())
    assert type(pool) is alexnet_ext.nn.MaxPool2d and not pool.training and pool.padding == 1
    relu = nn.ReLU()
    assert alexnet_ext.convert(relu) is relu


def test_subclasses_are_left_alone():
    class MyConv(nn.Conv2d):
        pass
    model = nn.Sequential(MyConv(3, 4, 3), nn.ReLU())
    alexnet_ext.convert(model)
    assert type(model[0]) is MyConv and type(model[1]) is nn.ReLU


def test_not_a_module():
    with pytest.raises(TypeError, match="module"):
        alexnet_ext.convert(torch.zeros(3))
