"""ONNX export of integer models, run in ONNX Runtime: the integer-operator graph reproduces
lowbit's integer model bit for bit; the QOperator graph (QLinearConv, float32 requantization
scales, as runtimes do) agrees within one quantization step where both see the same input."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _helpers import randomize_bn
from lowbit import models
from lowbit import nn as lnn
from lowbit.integer import to_integer

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from lowbit.integer.onnx_export import (  # noqa: E402
    MissingExtraError,
    export_onnx,
    onnx_session,
)


def _randomize_bn(model: nn.Module, seed: int) -> None:
    randomize_bn(model, torch.Generator().manual_seed(seed))  # negative gammas too


@pytest.fixture(scope="module")
def digits_cnn():
    """small_cnn trained for one epoch on digits, W8A8 with calibration."""
    from lowbit.data import BatchLoader, get_dataset

    train = BatchLoader(get_dataset("digits", split="train"), 128, shuffle=True, seed=0)
    test = BatchLoader(get_dataset("digits", split="test"), 360, shuffle=False)
    torch.manual_seed(0)
    model = models.create("small_cnn", width=8)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for x, y in train:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fq = lnn.convert(model.eval(), "w8a8", first_last="same")
    im = to_integer(fq, train, calib_batches=4)
    return im, next(iter(test))


@pytest.fixture(scope="module")
def resnet20_int():
    torch.manual_seed(1)
    model = models.create("resnet20")
    _randomize_bn(model, 1)
    fq = lnn.convert(model.eval(), "w8a8", first_last="same")
    return to_integer(fq, [torch.randn(16, 3, 32, 32)])


def _run(path, x: torch.Tensor) -> dict[str, np.ndarray]:
    s = onnx_session(path, threads=2)
    names = [o.name for o in s.get_outputs()]
    return dict(zip(names, s.run(None, {"input": x.numpy()})))


def _grid_nodes(im):
    return [n for n in im.nodes[1:-1] if n.requant is not None
            and n.requant.requantizer.dtype in (torch.int8, torch.uint8)]


@pytest.mark.parametrize("which", ["cnn", "resnet20"])
def test_integer_style_is_bit_exact_in_onnxruntime(which, digits_cnn, resnet20_int, tmp_path):
    if which == "cnn":
        im, (x, _) = digits_cnn
    else:
        im, x = resnet20_int, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    path = export_onnx(im, tmp_path / "m.onnx", style="integer", intermediates=True)
    outs = _run(path, x)
    assert np.array_equal(outs["logits"], im(x).numpy())
    _, vals = im.run_integer(im.quantize_input(x), return_values=True)
    for name, v in vals.items():
        assert np.array_equal(outs[name], v.numpy()), name
    onnx = pytest.importorskip("onnx")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert {"ConvInteger", "MatMulInteger"} <= ops
    assert not ops & {"Conv", "MatMul", "Gemm", "QLinearConv"}


def test_qoperator_style_within_one_step(digits_cnn, resnet20_int, tmp_path):
    im, (x, y) = digits_cnn
    path = export_onnx(im, tmp_path / "q.onnx", style="qoperator", intermediates=True)
    onnx = pytest.importorskip("onnx")
    assert "QLinearConv" in {n.op_type for n in onnx.load(path).graph.node}
    outs = _run(path, x)
    _, vals = im.run_integer(im.quantize_input(x), return_values=True)
    for n in _grid_nodes(im):
        d = np.abs(outs[n.output].astype(np.int64) - vals[n.output].numpy().astype(np.int64))
        assert d.max() <= 1, n.name  # one step at most, layer after layer
        assert (d > 0).mean() < 0.01, n.name
    pred_ort = outs["logits"].argmax(1)
    pred_int = im(x).argmax(1).numpy()
    assert (pred_ort == pred_int).mean() >= 0.99
    acc_ort = (pred_ort == y.numpy()).mean()
    acc_int = (pred_int == y.numpy()).mean()
    assert abs(acc_ort - acc_int) <= 0.01
    # on ResNet-20 the first requantization sees the same input in both: within one step
    im = resnet20_int
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    outs = _run(export_onnx(im, tmp_path / "r.onnx", style="qoperator", intermediates=True), x)
    _, vals = im.run_integer(im.quantize_input(x), return_values=True)
    first = _grid_nodes(im)[0]
    d = np.abs(outs[first.output].astype(np.int64) - vals[first.output].numpy())
    assert d.max() <= 1 and (d > 0).mean() < 0.01


def test_export_bad_input(digits_cnn, tmp_path):
    im = digits_cnn[0]
    with pytest.raises(TypeError, match="IntegerModel"):
        export_onnx(nn.Linear(2, 2), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="style"):
        export_onnx(im, tmp_path / "x.onnx", style="qdq")
    assert not list(tmp_path.iterdir())


def test_missing_extra_is_a_clear_error(digits_cnn, tmp_path, monkeypatch):
    im = digits_cnn[0]
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now fails
    with pytest.raises(MissingExtraError, match=r"extra 'export'.*pip install"):
        export_onnx(im, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="onnxruntime"):
        onnx_session(tmp_path / "m.onnx")
    with pytest.raises(ValueError):  # also a ValueError: the CLI reports it in one line
        export_onnx(im, tmp_path / "m.onnx")


def test_no_half_written_file(digits_cnn, tmp_path, monkeypatch):
    im = digits_cnn[0]
    target = tmp_path / "m.onnx"
    good = export_onnx(im, target).read_bytes()

    def broken(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        export_onnx(im, target, style="qoperator")
    assert target.read_bytes() == good  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary left
