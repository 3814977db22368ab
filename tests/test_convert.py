"""convert(), schemes, overrides, state_dict round trips, training, summary()."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import (
    QConv2d,
    QLinear,
    QuantScheme,
    clip_latent_weights,
    convert,
    get_scheme,
    list_schemes,
    quantized_modules,
    register_scheme,
    summary,
)
from lowbit.nn.convert import _SCHEMES


class _Attn(nn.Linear):
    """A Linear subclass: convert must leave it alone."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.ReLU(),
                                    nn.Conv2d(4, 8, 3, padding=1, bias=False))
        self.proj = _Attn(8, 8)
        self.hidden = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.layer1(x)).mean((2, 3))
        return self.fc(F.relu(self.hidden(self.proj(x))))


def _wfmt(m: nn.Module) -> str | None:
    return m.weight_quant.fmt.name if isinstance(m, (QLinear, QConv2d)) else None


def test_convert_swaps_only_linear_and_conv2d():
    net = Net()
    q = convert(net, "w4a4")
    assert type(net.hidden) is nn.Linear  # original untouched (inplace=False)
    assert isinstance(q.bn1, nn.BatchNorm2d) and type(q.bn1) is nn.BatchNorm2d
    assert isinstance(q.layer1[1], nn.ReLU)
    assert type(q.proj) is _Attn
    names = [n for n, _ in quantized_modules(q)]
    assert names == ["conv1", "layer1.0", "layer1.2", "hidden", "fc"]
    # parameters of the copy are distinct from the original's
    assert q.hidden.weight is not net.hidden.weight
    assert torch.equal(q.hidden.weight, net.hidden.weight)


def test_first_last_rule():
    q = convert(Net(), "w4a4")
    assert _wfmt(q.conv1) == "int8" and _wfmt(q.fc) == "int8"
    assert q.conv1.act_format == "uint8"
    assert _wfmt(q.layer1[0]) == "int4" and q.layer1[0].act_format == "uint4"
    same = convert(Net(), "w4a4", first_last="same")
    assert _wfmt(same.conv1) == "int4" and _wfmt(same.fc) == "int4"
    assert _wfmt(convert(Net(), "w4a4", skip_first_last=False).fc) == "int4"
    fp = convert(Net(), "w4a4", first_last="fp32")
    assert type(fp.conv1) is nn.Conv2d and type(fp.fc) is nn.Linear
    assert _wfmt(fp.hidden) == "int4"
    w1 = convert(Net(), "w1a1", first_last="w4a8")
    assert _wfmt(w1.conv1) == "int4" and w1.conv1.act_format == "uint8"
    assert _wfmt(w1.hidden) == "binary" and w1.hidden.act_format == "binary"
    # the FP8 schemes keep first and last in float by default (as the paper)
    f8 = convert(Net(), "fp8")
    assert type(f8.conv1) is nn.Conv2d and _wfmt(f8.hidden) == "e5m2"
    with pytest.raises(ValueError, match="conflicts"):
        convert(Net(), "w4a4", skip_first_last=False, first_last="fp32")


def test_inplace_keeps_parameters_and_optimizer():
    net = Net()
    params = list(net.parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    out = convert(net, "w8a8", inplace=True)
    assert out is net and isinstance(net.hidden, QLinear)
    assert [id(p) for p in net.parameters()] == [id(p) for p in params]
    loss = net(torch.randn(2, 1, 6, 6)).sum()
    loss.backward()
    before = net.hidden.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, net.hidden.weight)


def test_overrides():
    q = convert(Net(), "w4a4", overrides={"layer1.*": "w2a2", "fc": None, "layer1.2": "w8a8"})
    assert _wfmt(q.layer1[0]) == "int2"
    assert _wfmt(q.layer1[2]) == "int8"  # last matching pattern wins
    assert type(q.fc) is nn.Linear  # None keeps float, over the first/last rule
    assert _wfmt(q.conv1) == "int8" and _wfmt(q.hidden) == "int4"
    custom = QuantScheme(weight="ternary", act="uint4")
    q2 = convert(Net(), None, overrides={"hidden": custom})
    assert _wfmt(q2.hidden) == "ternary" and type(q2.conv1) is nn.Conv2d
    with pytest.raises(ValueError, match="matches no module.*layer1"):
        convert(Net(), "w4a4", overrides={"layer2.*": "w8a8"})
    with pytest.raises(ValueError, match="close names: hidden"):
        convert(Net(), "w4a4", overrides={"hiden": "w8a8"})


def test_unknown_scheme_error_lists_names():
    with pytest.raises(ValueError, match="did you mean 'w4a4'") as err:
        convert(Net(), "w4-a4")
    for name in ("fp32", "w8a8", "w1a1", "fp8", "fp8-hybrid"):
        assert repr(name) in str(err.value)
    with pytest.raises(TypeError, match="scheme must be"):
        convert(Net(), 8)
    with pytest.raises(TypeError, match="nn.Module"):
        convert("model", "w8a8")


def test_fp32_is_a_no_op():
    net = Net()
    for scheme in (None, "fp32"):
        q = convert(net, scheme)
        assert not list(quantized_modules(q))
        x = torch.randn(2, 1, 5, 5)
        net.eval()
        q.eval()
        assert torch.equal(q(x), net(x))


def test_builtin_schemes_and_registry():
    for name in ("fp32", "w8a8", "w4a4", "w1a1", "w1a2", "w2a2", "w4a8", "fp8", "fp8-hybrid",
                 "w8a8g8"):
        assert name in list_schemes()
    assert get_scheme("int8") is get_scheme("w8a8")
    assert get_scheme("W8A8").name == "w8a8"
    s = get_scheme("fp8-hybrid")
    assert s.weight.format.name == "e4m3" and s.grad.format.name == "e5m2"
    assert s.grad.rounding == "stochastic"
    assert get_scheme("w8a8g8").grad.format.name == "int8"
    register_scheme("test-w3a3", QuantScheme(weight="int3", act="uint3"))
    try:
        q = convert(Net(), "test-w3a3", first_last="same")
        assert _wfmt(q.hidden) == "int3"
        with pytest.raises(ValueError, match="already registered"):
            register_scheme("test-w3a3", QuantScheme(weight="int3"))
    finally:
        _SCHEMES.pop("test-w3a3")
    spec_dict = QuantScheme(weight={"fmt": "int4", "granularity": "channel"}, act="e4m3")
    assert spec_dict.weight.granularity == "channel" and spec_dict.act.observer == "none"
    with pytest.raises(TypeError, match="weight must be"):
        QuantScheme(weight=4)


def _train_some(model: nn.Module, steps: int = 3) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 1, 6, 6)), torch.randint(0, 3, (8,))).backward()
        opt.step()


@pytest.mark.parametrize("scheme", ["w8a8", "w4a4", "w1a2", "fp8", "fp8-hybrid", "w8a8g8"])
def test_state_dict_round_trip_identical_outputs(scheme):
    torch.manual_seed(0)
    q = convert(Net(), scheme)
    _train_some(q)
    sd = copy.deepcopy(q.state_dict())
    fresh = convert(Net(), scheme)
    fresh.load_state_dict(sd)
    q.eval()
    fresh.eval()
    x = torch.randn(4, 1, 6, 6)
    assert torch.equal(fresh(x), q(x))


def _blobs(n: int = 512, dim: int = 16, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    return x, y


@pytest.mark.parametrize("scheme", ["w8a8", "w1a1", "fp8"])
def test_tiny_model_trains(scheme):
    torch.manual_seed(0)
    x, y = _blobs()
    model = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.Hardtanh(),
                          nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Hardtanh(),
                          nn.Linear(64, 4))
    model = convert(model, scheme)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(60):
        idx = torch.arange(step * 64, step * 64 + 64) % x.shape[0]
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        clip_latent_weights(model)
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (scheme, first, last)
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.8


def test_summary_numbers():
    model = nn.Sequential(nn.Linear(64, 32, bias=False), nn.BatchNorm1d(32),
                          nn.Linear(32, 32, bias=False), nn.Linear(32, 10))
    q = convert(model, "w1a1", first_last="fp32")
    printed = []
    rows = summary(q, print_fn=printed.append)
    by_name = {r["name"]: r for r in rows}
    binary = by_name["2"]
    assert binary["weight_format"] == "binary" and binary["weight_bits"] == 1
    assert binary["params"] == 32 * 32
    assert binary["fp32_bytes"] / binary["memory_bytes"] == 32
    assert by_name["0"]["weight_format"] == "fp32" and by_name["0"]["memory_bytes"] == 64 * 32 * 4
    assert by_name["1"]["type"] == "BatchNorm1d" and by_name["1"]["params"] == 64
    assert by_name["3"]["memory_bytes"] == by_name["3"]["fp32_bytes"] == (320 + 10) * 4
    total_fp32 = sum(r["fp32_bytes"] for r in rows)
    total_mem = sum(r["memory_bytes"] for r in rows)
    assert total_fp32 == sum(p.numel() for p in q.parameters()) * 4
    table = printed[0]
    assert "binary" in table and "Total" in table
    assert f"{total_fp32 / total_mem:.2f}x" in table
    w8 = summary(convert(model, "w8a8"), print_fn=None)
    assert w8[0]["memory_bytes"] * 4 == w8[0]["fp32_bytes"]
    # int8 weights with an fp32 bias
    lin = summary(convert(nn.Sequential(nn.Linear(10, 10)), "w8a8"), print_fn=None)[0]
    assert lin["memory_bytes"] == 100 + 10 * 4



@pytest.mark.parametrize("scheme", ["w8a8g8", "fp8"])
def test_lstm_converts_under_quantized_backward_schemes(scheme):
    model = nn.ModuleDict({"lstm": nn.LSTM(8, 8), "fc": nn.Linear(8, 4)})
    m = convert(model, scheme, first_last="same")
    assert type(m["lstm"]).__name__ == "QLSTM"
    out, _ = m["lstm"](torch.randn(3, 2, 8))
    assert out.shape == (3, 2, 8)


@pytest.mark.parametrize("norm", ["range", "l1", "linf"])
def test_convert_swaps_batchnorm_variant(norm):
    from lowbit.nn.batchnorm import BATCHNORM_VARIANTS

    net = Net()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-1, 1)
        net.bn1.weight.uniform_(0.5, 2)
    q = convert(net, "w8a8", norm=norm, norm_kwargs={"act_format": "int8"})
    assert type(q.bn1) is BATCHNORM_VARIANTS[norm][1]
    assert q.bn1.act_format.name == "int8"
    assert torch.equal(q.bn1.running_mean, net.bn1.running_mean)
    assert torch.equal(q.bn1.weight, net.bn1.weight)
    assert type(net.bn1) is nn.BatchNorm2d  # not inplace: the original is untouched
    assert isinstance(q.fc, QLinear)
    # "bn" and None keep BatchNorm; a norm alone works on a float scheme too
    assert type(convert(net, "fp32", norm="bn").bn1) is nn.BatchNorm2d
    assert type(convert(net, None, norm=norm).bn1) is BATCHNORM_VARIANTS[norm][1]


def test_convert_norm_errors_name_the_choices():
    with pytest.raises(ValueError, match="range"):
        convert(Net(), "w8a8", norm="layer")
    with pytest.raises(ValueError, match="norm_kwargs"):
        convert(Net(), "w8a8", norm_kwargs={"act_format": "int8"})
