"""Model zoo: registry behaviour, forward shapes, parameter counts, LM semantics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.models import create, list_models, register_model
from lowbit.models.registry import _REGISTRY

# name -> (create kwargs, input shape, expected output shape)
CASES = {
    "mlp": ({}, (2, 1, 28, 28), (2, 10)),
    "small_cnn": ({}, (2, 1, 8, 8), (2, 10)),
    "lenet5": ({}, (2, 1, 28, 28), (2, 10)),
    "resnet20": ({}, (2, 3, 32, 32), (2, 10)),
    "resnet32": ({"num_classes": 100}, (2, 3, 32, 32), (2, 100)),
    "resnet56": ({}, (2, 3, 32, 32), (2, 10)),
    "vgg_small": ({}, (2, 3, 32, 32), (2, 10)),
    "binarynet_cifar": ({"width": 0.25}, (2, 3, 32, 32), (2, 10)),
    "alexnet": ({"batchnorm": True}, (2, 3, 224, 224), (2, 10)),
    "resnet18": ({}, (2, 3, 224, 224), (2, 10)),
    "resnet50": ({"num_classes": 1000}, (2, 3, 224, 224), (2, 1000)),
    "lstm_lm": ({"num_classes": 50}, (7, 3), (7, 3, 50)),
    "transformer_lm": ({"num_classes": 50}, (7, 3), (7, 3, 50)),
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_every_registered_model_has_a_case():
    assert set(list_models()) >= set(CASES)
    assert set(CASES) >= set(list_models())


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_shape_and_first_last_layers(name):
    kw, in_shape, out_shape = CASES[name]
    torch.manual_seed(0)
    model = create(name, **kw).eval()
    if name.endswith("_lm"):
        x = torch.randint(0, out_shape[-1], in_shape)
        y, _ = model(x)
    else:
        y = model(torch.randn(in_shape))
    assert tuple(y.shape) == out_shape
    assert torch.isfinite(y).all()
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    # module order is forward order: the last layer produces the classes
    assert layers[-1].out_features == out_shape[-1]
    if not name.endswith("_lm"):
        first = layers[0]
        assert (first.in_channels if isinstance(first, nn.Conv2d) else first.in_features) == (
            in_shape[1] if isinstance(first, nn.Conv2d) else in_shape[1] * in_shape[2]
            * in_shape[3])


def lenet5_count(num_classes: int) -> int:
    # conv(1->6,5x5)+b, conv(6->16,5x5)+b, 400->120, 120->84, 84->classes, all with bias
    return (6 * 25 + 6) + (16 * 6 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (
        84 * num_classes + num_classes)


def cifar_resnet_count(depth: int, classes: int = 10) -> int:
    """Option A: no shortcut parameters. Each conv has no bias, each BN has 2C params."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16
    cin = 16
    for w in (16, 32, 64):
        for _ in range(n):
            total += cin * w * 9 + 2 * w + w * w * 9 + 2 * w
            cin = w
    return total + 64 * classes + classes


@pytest.mark.parametrize(
    "name,kw,expected",
    [
        ("lenet5", {}, lenet5_count(10)),
        ("resnet20", {}, cifar_resnet_count(20)),
        ("resnet32", {}, cifar_resnet_count(32)),
        ("resnet56", {}, cifar_resnet_count(56)),
        # published counts (torchvision's model cards; He et al. Table 6: 0.27M / 0.46M / 0.85M)
        ("resnet18", {"num_classes": 1000}, 11_689_512),
        ("resnet50", {"num_classes": 1000}, 25_557_032),
        ("alexnet", {"num_classes": 1000}, 61_100_840),
    ],
)
def test_parameter_counts(name, kw, expected):
    assert n_params(create(name, **kw)) == expected


def test_cifar_resnet_paper_sizes():
    # He et al. 2016 Table 6 rounds to 0.27M / 0.46M / 0.85M
    for depth, millions in ((20, 0.27), (32, 0.46), (56, 0.85)):
        assert round(n_params(create(f"resnet{depth}")) / 1e6, 2) == millions


def test_binarynet_cifar_architecture():
    m = create("binarynet_cifar")
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    fcs = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [c.out_channels for c in convs] == [128, 128, 256, 256, 512, 512]
    assert [(f.in_features, f.out_features) for f in fcs] == [(8192, 1024), (1024, 1024),
                                                              (1024, 10)]
    assert isinstance(list(m.modules())[-1], nn.BatchNorm1d)  # BN after the last layer
    assert sum(isinstance(x, nn.Hardtanh) for x in m.modules()) == 8
    half = create("binarynet_cifar", width=0.5)
    assert [c.out_channels for c in half.modules() if isinstance(c, nn.Conv2d)] == [
        64, 64, 128, 128, 256, 256]


def test_resnet_shortcut_options():
    a, b = create("resnet20", shortcut="A"), create("resnet20", shortcut="B")
    # option B adds two 1x1 projections + BN: 16*32 + 2*32 + 32*64 + 2*64
    assert n_params(b) - n_params(a) == 16 * 32 + 64 + 32 * 64 + 128
    with pytest.raises(ValueError, match="shortcut"):
        create("resnet20", shortcut="C")


def test_option_a_shortcut_is_subsample_and_zero_pad():
    from lowbit.models.resnet_cifar import PadShortcut

    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(2, 16)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert (y[:, :8] == 0).all() and (y[:, 24:] == 0).all()


def test_unknown_name_suggests_close_match():
    with pytest.raises(ValueError, match="resnet20"):
        create("resnet2")
    with pytest.raises(ValueError, match="Valid names"):
        create("zzzz")


def test_unknown_argument_is_type_error_with_suggestion():
    with pytest.raises(TypeError, match="'hidden'"):
        create("mlp", hiden=(10,))
    with pytest.raises(ValueError, match="num_classes"):
        create("mlp", num_classes=0)


def test_register_model_bare_and_named():
    try:
        @register_model
        def _tiny_test_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
            return nn.Linear(in_channels, num_classes)

        @register_model("tiny_named_test_model")
        def _other(num_classes: int = 10) -> nn.Module:
            return nn.Linear(3, num_classes)

        assert "_tiny_test_model" in list_models()
        assert create("_tiny_test_model", num_classes=4, in_channels=2).weight.shape == (4, 2)
        assert create("tiny_named_test_model", num_classes=5).weight.shape == (5, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model("tiny_named_test_model")(lambda num_classes=10: nn.Identity())
    finally:
        _REGISTRY.pop("_tiny_test_model", None)
        _REGISTRY.pop("tiny_named_test_model", None)


def test_mlp_in_features_from_shape():
    m = create("mlp", hidden=(32,), in_shape=(1, 8, 8))
    assert m(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    m = create("mlp", hidden=[64, 32], in_features=12, batchnorm=True, dropout=0.1)
    assert m.features[1].in_features == 12 and m(torch.randn(5, 12)).shape == (5, 10)


def test_creation_is_deterministic_under_seed():
    torch.manual_seed(3)
    a = create("resnet20")
    torch.manual_seed(3)
    b = create("resnet20")
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)


def test_lstm_state_carries_across_windows():
    torch.manual_seed(0)
    m = create("lstm_lm", num_classes=30, hidden=16, layers=2).eval()
    x = torch.randint(0, 30, (10, 3))
    full, _ = m(x)
    first, state = m(x[:4])
    second, _ = m(x[4:], state)
    torch.testing.assert_close(torch.cat([first, second]), full, rtol=1e-5, atol=1e-6)
    h, c = m.init_state(3)
    assert h.shape == (2, 3, 16) and c.shape == (2, 3, 16)


def test_tied_weights():
    m = create("lstm_lm", num_classes=40, hidden=16, tie_weights=True)
    assert m.decoder.weight is m.encoder.weight
    with pytest.raises(ValueError, match="tie_weights"):
        create("lstm_lm", num_classes=40, hidden=16, embed_dim=8, tie_weights=True)
    t = create("transformer_lm", num_classes=40, d_model=16, tie_weights=True)
    assert t.decoder.weight is t.encoder.weight


def test_transformer_is_causal():
    torch.manual_seed(0)
    m = create("transformer_lm", num_classes=30, d_model=32, heads=4, layers=2).eval()
    x = torch.randint(0, 30, (12, 2))
    y = x.clone()
    y[6:] = (y[6:] + 1) % 30  # change only the future
    lx, _ = m(x)
    ly, _ = m(y)
    torch.testing.assert_close(lx[:6], ly[:6])
    assert not torch.allclose(lx[6:], ly[6:])
    with pytest.raises(ValueError, match="max_len"):
        create("transformer_lm", num_classes=30, max_len=4)(torch.zeros(5, 1, dtype=torch.long))


def test_small_cnn_learns_a_batch():
    torch.manual_seed(0)
    m = create("small_cnn")
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
