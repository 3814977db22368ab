"""Tests for ``lowbit ptq``: option parsing, the CLI round trip (quantize -> report -> eval),
the ablation table, and errors at the boundary."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.ptq import OPTIONS, check_options, ptq_options, run_ptq
from lowbit.ptq.run import VARIANTS, parse_precisions

train_mod = pytest.importorskip("lowbit.train")


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    """A small CNN trained for two short epochs on scikit-learn digits (about a second)."""
    out = tmp_path_factory.mktemp("fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_mod.train("digits", ["variant=fp32", "epochs=2", "data.limit=600"], out_dir=out,
                        log=None)
    finally:
        torch.set_num_threads(threads)
    return out / "last.pt"


@pytest.fixture(scope="module")
def ptq_run(float_ckpt, tmp_path_factory):
    """`lowbit ptq` at W4A4 with the ablation, run through the command line."""
    out = tmp_path_factory.mktemp("ptq")
    rc = main(["ptq", str(float_ckpt), "w_bits=4", "a_bits=4", "num_samples=128",
               "variants=true", "clip=aciq", f"out={out}"])
    assert rc == 0
    return out


def _eval_top1(capsys, path) -> float:
    capsys.readouterr()
    assert main(["eval", str(path)]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    return float(next(ln[1] for ln in lines if ln and ln[0] == "val_top1").rstrip("%"))


def test_cli_round_trip_eval_equals_report(ptq_run, capsys):
    report = json.loads((ptq_run / "report.json").read_text())
    m = report["metrics"]
    # `lowbit eval` on the written checkpoint gives exactly the accuracy in the report
    got = train_mod.engine.evaluate(ptq_run / "model.pt")
    assert got["val_top1"] == m["top1"]
    assert _eval_top1(capsys, ptq_run / "model.pt") == pytest.approx(m["top1"], abs=0.005)
    assert m["fp32_top1"] > 50.0 and m["top1"] > 40.0
    assert m["top1_drop"] == pytest.approx(m["fp32_top1"] - m["top1"])
    # the ablation: every variant evaluated; "all" is the main configuration
    assert list(m["variants"]) == list(VARIANTS)
    assert m["variants"]["all"]["top1"] == m["top1"]


def test_cli_report_contents(ptq_run):
    report = json.loads((ptq_run / "report.json").read_text())
    cfg = report["config"]
    assert (cfg["w_bits"], cfg["a_bits"], cfg["clip"], cfg["num_samples"]) == (4, 4, "aciq", 128)
    layers = report["layers"]
    assert layers[0]["first_last"] and layers[-1]["first_last"]
    assert layers[0]["w_bits"] == 8 and layers[-1]["a_bits"] == 8
    for r in layers[1:-1]:
        assert r["w_bits"] == 4 and r["a_bits"] == 4  # the budget, under bit allocation
        assert r["a_clip_hi"] > r["a_clip_lo"]
        # MSE and SQNR of each tensor after each method, in the order applied
        assert list(r["w_sqnr_db"]) == ["naive", "clip", "bit_alloc", "bias_correction"]
        assert list(r["a_mse"]) == ["naive", "clip", "bit_alloc"]
        # ACIQ keeps, per channel, the lowest sample MSE among its candidates (min/max included)
        assert r["a_mse"]["clip"] <= r["a_mse"]["naive"] * (1 + 1e-9)
    md = (ptq_run / "report.md").read_text()
    assert md.startswith("# Post-training quantization report")
    for word in ("fp32_top1", "| naive |", "| all |", layers[1]["layer"]):
        assert word in md


def test_cli_table_and_its_checkpoints(float_ckpt, tmp_path, capsys):
    out = tmp_path / "table"
    rc = main(["ptq", str(float_ckpt), "precisions=w8a8,w3a3", "num_samples=64",
               f"out={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "table.json").read_text())
    assert [r["precision"] for r in table["rows"]] == ["W8A8", "W3A3"]
    md = (out / "table.md").read_text()
    assert "| W8A8 |" in md and "+bias correction" in md and md.splitlines()[2] in printed
    for r in table["rows"]:
        assert set(VARIANTS) <= set(r)
        assert r["fp32_top1"] == table["fp32_top1"]
        # the checkpoint written per precision is the main configuration (options given),
        # and it evaluates to the accuracy in the table
        assert train_mod.engine.evaluate(r["checkpoint"])["val_top1"] == r["top1"]
    w8a8 = table["rows"][0]
    assert abs(w8a8["all"] - table["fp32_top1"]) <= 1.0


def test_run_ptq_rejects_quantized_and_non_float_checkpoints(ptq_run, float_ckpt, tmp_path):
    with pytest.raises(ValueError, match="already a post-training quantized"):
        run_ptq(ptq_run / "model.pt")
    ckpt = torch.load(float_ckpt, weights_only=False)
    ckpt["config"]["quant"]["scheme"] = "w8a8"
    torch.save(ckpt, tmp_path / "qat.pt")
    with pytest.raises(ValueError, match="float checkpoint"):
        run_ptq(tmp_path / "qat.pt")


@pytest.mark.parametrize("items,match", [
    (["clip=kl"], "clip must be one of minmax, percentile, mse, aciq_laplace"),
    (["w_clip=max"], "w_clip must be one of"),
    (["w_bits=0"], r"w_bits must be an integer \[1, 16\]"),
    (["a_bits=4.5"], "a_bits must be an integer"),
    (["bias_correction=var"], "bias_correction must be one of true, false, mean, mean_var"),
    (["bit_alloc=maybe"], "bit_alloc must be true or false"),
    (["first_last_bits=zero"], "first_last_bits"),
    (["num_samples=0"], "num_samples"),
    (["percentile=40"], "percentile"),
    (["precisions=w4"], "w<bits>a<bits>"),
    (["precisions=w4a4,w4a4"], "twice"),
    (["precisions=w8a8", "w_bits=4"], "either precisions"),
    (["wbits=4"], "unknown ptq option 'wbits'; valid options: w_bits, a_bits"),
])
def test_bad_options_name_the_valid_choices(items, match):
    with pytest.raises(ValueError, match=match):
        ptq_options(items)


def test_cli_errors_exit_2_with_one_line(float_ckpt, tmp_path, capsys):
    assert main(["ptq", str(float_ckpt), "clip=kl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: clip must be one of") and "aciq_gaussian" in err
    assert main(["ptq", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["ptq", str(float_ckpt), "w_bits"]) == 2  # not key=value
    assert "key=value" in capsys.readouterr().err
    assert main(["ptq", str(float_ckpt), "data.nonsense=1"]) == 2  # config keys are checked
    assert "data.nonsense" in capsys.readouterr().err


def test_options_are_checked_before_anything_loads(tmp_path):
    # a bad option is reported even though the checkpoint does not exist
    with pytest.raises(ValueError, match="clip must be one of"):
        run_ptq(tmp_path / "missing.pt", clip="kl")
    with pytest.raises(ValueError, match="unknown ptq option 'precision'"):
        run_ptq(tmp_path / "missing.pt", precision="w4a4")


def test_option_parsing_and_normalisation():
    opts, overrides = ptq_options([
        "w_bits=3", "clip=aciq-laplace", "w_clip=ACIQ-Gaussian", "bias_correction=mean",
        "first_last_bits=none", "bit_alloc=false", "out=/tmp/x", "data.root=/data",
        "device=cpu", "per_channel_weights=false",
    ])
    assert opts == {"w_bits": 3, "clip": "aciq_laplace", "w_clip": "aciq_gaussian",
                    "bias_correction": "mean", "first_last_bits": None, "bit_alloc": False,
                    "per_channel_weights": False, "out_dir": "/tmp/x"}
    assert overrides == ["data.root=/data", "device=cpu"]
    assert parse_precisions("w8a8,W4A4") == [(8, 8), (4, 4)]
    assert parse_precisions([(8, 4)]) == [(8, 4)]
    assert check_options(bias_correction=True, first_last_bits=8, percentile=99) == {
        "bias_correction": True, "first_last_bits": 8, "percentile": 99.0}
    assert set(OPTIONS) >= {"w_bits", "a_bits", "clip", "w_clip", "bit_alloc",
                            "bias_correction", "first_last_bits", "num_samples", "out",
                            "variants"}


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["ptq", "--help"])
    text = capsys.readouterr().out
    for key in OPTIONS:
        assert key in text
