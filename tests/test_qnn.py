"""QNN / BinaryNet training (issue 5): the hardtanh STE, latent-weight clipping and Glorot
learning rates in the training loop, shift BN, 6-bit gradients, the 8-bit-input first layer,
a short binary MNIST run and packed (XNOR) inference of the trained model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import list_recipes, resolve
from lowbit.models import create
from lowbit.nn import (
    PackedBinaryLinear,
    QLinear,
    ShiftBatchNorm1d,
    ShiftBatchNorm2d,
    convert,
    pack_binary_model,
)
from lowbit.nn.shift_bn import to_shift_batchnorm
from lowbit.train import Callback, evaluate, train
from lowbit.train.checkpoint import load_checkpoint
from lowbit.train.shift_adamax import glorot_lr_scale


@pytest.fixture(autouse=True)
def one_thread():
    """Small models train fastest (and steadiest on a shared machine) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sign(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0)


def binary_mlp(hidden=(32,), scheme: str = "w1a1", first_last: str = "same",
               norm: str | None = None) -> nn.Module:
    """The BinaryNet MLP shape on 8x8 digits: 8-bit-input first layer, binary hidden layers
    (and classifier, unless ``first_last`` says otherwise)."""
    torch.manual_seed(0)
    model = create("mlp", in_features=64, hidden=list(hidden), batchnorm=True,
                   activation="hardtanh")
    return convert(model, scheme, first_last=first_last, overrides={"features.1": "w1a8"},
                   norm=norm)


def digits_cfg(tmp_path: Path, **over) -> dict:
    cfg = {"data.name": "digits", "data.batch_size": 64, "epochs": 1, "progress": False,
           "optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.0,
           "optim.weight_decay": 0.0, "schedule.name": "none", "loss.name": "squared_hinge",
           "out": str(tmp_path)}
    cfg.update(over)
    return resolve({"recipe": "qnn_digits", "model": {"name": "mlp"}}, cfg)


# ------------------------------------------------------------------------------------ STE
def test_binary_layer_forward_is_sign_and_backward_is_the_hardtanh_ste():
    layer = convert(nn.Linear(16, 8), "w1a1", first_last="same")
    with torch.no_grad():
        layer.weight.copy_(torch.randn(8, 16) * 1.5)  # some latent weights beyond +-1
    x = torch.randn(5, 16) * 1.5
    x[0, :4] = 0.0  # sign(0) = +1
    x.requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    xb, wb = sign(x.detach()), sign(layer.weight.detach())
    assert torch.equal(y, F.linear(xb, wb, layer.bias))
    assert torch.equal(x.grad, (g @ wb) * (x.detach().abs() <= 1))
    assert torch.equal(layer.weight.grad, (g.t() @ xb) * (layer.weight.detach().abs() <= 1))
    assert torch.equal(layer.bias.grad, g.sum(0))
    assert 0 < int((x.grad == 0).sum()) < x.numel()  # the mask cancels some, not all


class StepRecorder(Callback):
    """Checks every SGD step: w_new = clip(w + s * (-lr * grad), -1, 1) for binary layers (s
    their Glorot factor), w - lr * grad for everything else (the 8-bit classifier too)."""

    def __init__(self, lr: float, clip: bool, glorot: bool) -> None:
        self.lr, self.clip, self.glorot = lr, clip, glorot
        self.steps = 0
        self.at_bound = 0

    def on_train_start(self, trainer) -> None:
        model = trainer.model
        self.params = dict(model.named_parameters())
        self.binary = {f"{n}.weight" for n, m in model.named_modules()
                       if isinstance(m, QLinear) and m.weight_quant.kind == "binary"}
        self.scale = {}
        for name, mod in model.named_modules():
            if f"{name}.weight" in self.binary and self.glorot:
                self.scale[f"{name}.weight"] = glorot_lr_scale(mod)
        self.old = {n: p.detach().clone() for n, p in self.params.items()}

    def after_step(self, trainer) -> None:
        for name, p in self.params.items():
            old = self.old[name]
            want = old.add(p.grad, alpha=-self.lr)
            if name in self.scale:
                want = (want - old) * self.scale[name] + old
            if self.clip and name in self.binary:
                self.at_bound += int((want.abs() > 1).sum())
                want = want.clamp(-1, 1)
            assert torch.equal(p.detach(), want), (name, self.steps)
            self.old[name] = p.detach().clone()
        self.steps += 1


@pytest.mark.parametrize("glorot,lr", [(False, 1.0), (True, 0.1)])
def test_training_loop_clips_latent_weights_and_scales_updates(tmp_path, glorot, lr):
    callbacks = (["glorot_lr"] if glorot else []) + ["clip_latent_weights"]
    rec = StepRecorder(lr=lr, clip=True, glorot=glorot)
    model = binary_mlp(hidden=(32, 32), first_last="w8a8")
    assert model.classifier.weight_quant.fmt.name == "int8"
    with torch.no_grad():  # the Theano initialisation U(-1, 1): latent weights near the bound
        model.features[1].weight.uniform_(-1, 1)
        model.features[4].weight.uniform_(-1, 1)
    train(digits_cfg(tmp_path, **{"train.callbacks": callbacks, "optim.lr": lr}),
          model=model, callbacks=[rec], log=None)
    assert rec.steps > 10 and len(rec.binary) == 2  # first and hidden layer, not classifier
    assert rec.at_bound > 0  # the test can fail: some updates went past the bound
    for name in rec.binary:
        assert float(rec.params[name].detach().abs().max()) <= 1.0


def test_glorot_lr_resumes_exactly(tmp_path):
    """The Glorot hooks leave the optimizer's state alone: 1 + 1 epochs = 2 epochs, bit for bit."""
    over = {"train.callbacks": ["glorot_lr", "clip_latent_weights"], "optim.name": "adam",
            "optim.lr": 0.003}
    full = train(digits_cfg(tmp_path / "full", epochs=2, **over), model=binary_mlp(), log=None)
    train(digits_cfg(tmp_path / "cut", epochs=1, **over), model=binary_mlp(), log=None)
    resumed = train(resume=tmp_path / "cut", overrides=["epochs=2"], model=binary_mlp(),
                    log=None)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_shift_adamax_with_power_of_two_glorot_scales_trains(tmp_path):
    over = {"train.callbacks": ["glorot_lr_pow2", "clip_latent_weights"],
            "optim.name": "shift_adamax", "optim.lr": 2**-8, "epochs": 2}
    res = train(digits_cfg(tmp_path, **over), model=binary_mlp(norm="shift"), log=None)
    first, last = res.metrics[0]["train_loss"], res.metrics[-1]["train_loss"]
    assert last < first and res.final["val_top1"] > 50.0


# -------------------------------------------------------------------------------- shift BN
def test_shift_bn_model_evaluates_the_same_after_reload(tmp_path):
    """quant.norm = "shift" is a module swap in convert, so ``lowbit eval`` of the checkpoint
    rebuilds the trained model: the same accuracy and loss, and shifts (powers of two) in
    every BN layer. Plain BN with the same state evaluates differently."""
    over = {"model.kwargs": {"in_features": 64, "hidden": [32], "batchnorm": True,
                             "activation": "hardtanh", "final_bn": True},
            "quant.scheme": "w1a1", "quant.first_last": "same",
            "quant.overrides": {"features.1": "w1a8"}, "quant.norm": "shift",
            "optim.name": "adam", "optim.lr": 0.003, "epochs": 2,
            "train.callbacks": ["glorot_lr", "clip_latent_weights"]}
    torch.manual_seed(0)
    res = train(digits_cfg(tmp_path, **over), log=None)
    bns = [m for m in res.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 2 and all(type(m) is ShiftBatchNorm1d for m in bns)
    for bn in bns:  # evaluation multiplies by signed powers of two (shifts)
        scale = bn.inference_scale()
        assert torch.equal(scale.abs().log2(), scale.abs().log2().round())
    assert res.final["val_top1"] > 50.0
    ev = evaluate(tmp_path)
    assert ev["val_top1"] == res.final["val_top1"] and ev["val_loss"] == res.final["val_loss"]
    # the same weights with ordinary BN (what the old callback left for `lowbit eval`)
    plain = create("mlp", in_features=64, hidden=[32], batchnorm=True, activation="hardtanh",
                   final_bn=True)
    plain = convert(plain, "w1a1", first_last="same", overrides={"features.1": "w1a8"})
    plain.load_state_dict(load_checkpoint(tmp_path)["model"])
    x = torch.randn(64, 64)
    with torch.no_grad():
        assert not torch.equal(plain.eval()(x), res.model.eval()(x))


def test_shift_batchnorm_callback_name_points_to_the_recipe_key(tmp_path):
    with pytest.raises(ValueError, match='quant.norm = "shift"'):
        train(digits_cfg(tmp_path, **{"train.callbacks": ["shift_batchnorm"]}),
              model=binary_mlp(), log=None)


def test_to_shift_batchnorm_shares_parameters_and_state():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.2),
                          nn.BatchNorm1d(6, affine=False), nn.Unflatten(1, (6, 1, 1)),
                          nn.BatchNorm2d(6, track_running_stats=False))
    model(torch.randn(8, 4))
    model[2].eval()
    weight = model[1].weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert to_shift_batchnorm(model) == 3
    assert [type(m) for m in model[1:]] == [ShiftBatchNorm1d, ShiftBatchNorm1d, nn.Unflatten,
                                            ShiftBatchNorm2d]
    assert model[1].weight is weight and model[1].momentum == 0.2
    assert model[1].training and not model[2].training and model[4].running_mean is None
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert to_shift_batchnorm(model) == 0  # nothing left to swap
    model(torch.randn(8, 4))


def test_convert_norm_shift():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Hardtanh(), nn.Linear(6, 3))
    out = convert(model, "w1a1", norm="shift", norm_kwargs={"momentum": 0.125})
    assert type(out[1]) is ShiftBatchNorm1d and out[1].momentum == 0.125
    assert type(model[1]) is nn.BatchNorm1d  # not inplace: the original is untouched
    with pytest.raises(ValueError, match="momentum"):
        convert(model, "w1a1", norm="shift", norm_kwargs={"act_format": "int8"})
    with pytest.raises(ValueError, match="shift"):
        convert(model, "w1a1", norm="shiftbn")


# ------------------------------------------------------------------------ 6-bit gradients
def test_six_bit_gradient_scheme_rounds_the_output_gradient():
    torch.manual_seed(0)
    layer = convert(nn.Linear(32, 16), "w1a1g6", first_last="same")
    assert layer.grad_quant is not None and layer.grad_quant.fmt.name == "int6"
    x = sign(torch.randn(1, 32))  # one sample: dW[i, j] = g_q[i] * x[j]
    g = torch.randn(1, 16)
    (layer(x) * g).sum().backward()
    step = float(g.abs().max()) / 31  # int6: 31 levels each side, scale from max |g|
    k = layer.weight.grad / step
    assert torch.allclose(k, k.round(), atol=1e-4) and float(k.abs().max()) <= 31 + 1e-4
    assert not torch.allclose(layer.weight.grad, g.t() * x)  # the gradient was rounded
    assert torch.allclose(layer.weight.grad, g.t() * x, atol=step + 1e-6)


# ---------------------------------------------------------------------- 8-bit first layer
def test_first_layer_takes_8_bit_inputs_and_equals_the_bit_plane_product():
    """w1a8: binary weights, 8-bit inputs. For normalised 8-bit images the input quantizer
    keeps every pixel level (up to one constant offset below half a step: its grid must hold
    0 exactly), and the layer equals the QNN bit-plane product on the raw pixels, mapped back
    through the normalisation."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (20, 64), generator=g)
    pixels[0, 0], pixels[0, 1] = 0, 255  # the batch spans the full 8-bit range
    mean, std = 0.1307, 0.3081  # MNIST's: 255 * mean is not an integer
    x = (pixels / 255.0 - mean) / std
    step = 1 / (255 * std)
    model = binary_mlp()
    first = model.features[1]
    assert first.weight_quant.kind == "binary" and first.act_quant.fmt.name == "uint8"
    model.train()
    offset = first.act_quant(x) - x
    c = float(offset.mean())
    assert float((offset - c).abs().max()) < 1e-5 and 0 < abs(c) <= step / 2 + 1e-6
    y = first(x)
    packed = PackedBinaryLinear.from_weight(first.weight.detach(), input_bits=8)
    acc = packed(pixels)  # pixels @ sign(W).T, exactly, bit plane by bit plane
    wsum = sign(first.weight.detach()).sum(1)
    ref = acc * step + (c - mean / std) * wsum
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ binary MNIST + packing
def test_binary_mnist_mlp_learns_and_packed_model_gives_the_same_logits(shared_datasets,
                                                                         tmp_path):
    """The mnist_mlp_w1a1 recipe shortened to 1 epoch on 10,000 images with 2x256 hidden
    units: test accuracy (2,000 random test images) rises from chance (10 %) to above 75 %
    (measured 87 %). The packed XNOR model gives exactly the fake-quant model's logits."""
    if not (shared_datasets / "mnist").is_dir():
        pytest.skip("MNIST not in the shared datasets")
    from lowbit.data import BatchLoader, get_dataset

    res = train("mnist_mlp_w1a1", [f"data.root={shared_datasets}", "data.limit=10000",
                                   "data.eval_limit=2000", "epochs=1", "progress=false",
                                   "model.kwargs.hidden=[256, 256]"],
                out_dir=tmp_path, log=None)
    assert res.final["val_top1"] > 75.0, res.final
    model = res.model.eval()
    packed = pack_binary_model(model)
    assert isinstance(packed.features[4], PackedBinaryLinear)
    assert isinstance(packed.features[1], QLinear)  # 8-bit-input first layer stays
    test = get_dataset("mnist", "test", root=shared_datasets)
    x, y = next(iter(BatchLoader(test, 500, shuffle=False)))
    with torch.no_grad():
        logits, packed_logits = model(x), packed(x)
    assert torch.equal(logits, packed_logits)
    assert float((logits.argmax(1) == y).float().mean()) > 0.7


# -------------------------------------------------------------------------------- recipes
QNN_RECIPES = {
    "mnist_mlp_w1a1": "w1a1", "mnist_mlp_w1a2": "w1a2", "cifar10_binarynet_w1a1": "w1a1",
    "cifar10_binarynet_w1a2": "w1a2", "cifar10_binarynet_w2a2": "w2a2",
    "ptb_lstm_fp32": "fp32", "ptb_lstm_w2a2": "w2a2", "ptb_lstm_w3a3": "w3a3",
    "ptb_lstm_w4a4": "w4a4", "imagenet_alexnet_w1a2": "w1a2", "imagenet_resnet18_w1a2": "w1a2",
}


def test_mlp_final_bn_normalises_the_bias_free_classifier():
    torch.manual_seed(0)
    plain = create("mlp", in_features=64, hidden=[32])
    head = create("mlp", in_features=64, hidden=[32], final_bn=True)
    assert plain.final_bn is None and plain.classifier.bias is not None
    assert isinstance(head.final_bn, nn.BatchNorm1d) and head.classifier.bias is None
    assert set(head.state_dict()) - set(plain.state_dict()) == {
        f"final_bn.{k}" for k in ("weight", "bias", "running_mean", "running_var",
                                  "num_batches_tracked")} and "classifier.bias" not in head.state_dict()
    x = torch.randn(256, 64) * 5 + 3
    with torch.no_grad():
        head.final_bn.weight.fill_(2.0)
        head.final_bn.bias.fill_(0.5)
        y = head.train()(x)
        z = head.classifier(head.features(x))
    # training mode: each logit is its batch-normalised pre-activation, times gamma plus beta
    torch.testing.assert_close(y, 2.0 * (z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-5).sqrt()
                               + 0.5, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,act", [("mnist_mlp_w1a1", "binary"), ("mnist_mlp_w1a2", "uint2")])
def test_mnist_recipes_build_the_paper_net(name, act):
    """Binary weights everywhere, 8-bit inputs to the first layer, a low-bit classifier
    followed by BatchNorm (the BinaryNet MNIST net)."""
    from lowbit.train.engine import Task, build_model

    cfg = resolve(name, ["model.kwargs.hidden=[16, 16, 16]"])
    model = build_model(cfg, Task(kind="classify", num_classes=10, in_channels=1))
    qs = [(n, m) for n, m in model.named_modules() if isinstance(m, QLinear)]
    assert [n for n, _ in qs] == ["features.1", "features.4", "features.7", "classifier"]
    assert all(m.weight_quant.kind == "binary" for _, m in qs)
    assert qs[0][1].act_quant.fmt.name == "uint8"
    assert all(m.act_quant.fmt.name == act for _, m in qs[1:])
    assert isinstance(model.final_bn, nn.BatchNorm1d)


@pytest.mark.parametrize("name,scheme", sorted(QNN_RECIPES.items()))
def test_qnn_recipes(name, scheme):
    assert name in {n for n, _ in list_recipes()}
    cfg = resolve(name)
    assert cfg["quant"]["scheme"] == scheme
    if scheme in ("w1a1", "w1a2"):
        assert "clip_latent_weights" in cfg["train"]["callbacks"]
    if scheme in ("w1a1", "w1a2") and not name.startswith("imagenet"):
        assert cfg["loss"]["name"] == "squared_hinge"
        assert set(cfg["quant"]["overrides"].values()) == {"w1a8"}
