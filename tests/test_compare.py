"""lowbit compare: runs side by side (table and overlaid curves) from their folders."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.cli import main
from lowbit.train.metrics import compare_table, find_runs


def _run(folder, top1, scheme="fp32", norm="bn", ppl=None, loss_scale=None):
    folder.mkdir(parents=True)
    rows = []
    for i, v in enumerate(top1 if ppl is None else ppl):
        row = {"epoch": i + 1, "lr": 0.1, "train_loss": 2.0 - 0.1 * i, "time_s": 60.0}
        row["val_ppl" if ppl is not None else "val_top1"] = v
        if loss_scale is not None:
            row["loss_scale"] = loss_scale[i]
        rows.append(row)
    (folder / "metrics.json").write_text(json.dumps(rows))
    torch.save({"config": {"quant": {"scheme": scheme, "norm": norm, "norm_bits": 8},
                           "optim": {"master_dtype": "fp32"}, "scaler": {"name": "none"}}},
               folder / "last.pt")
    return folder


def test_table_and_plot_of_variant_runs(tmp_path, capsys):
    parent = tmp_path / "c10"
    _run(parent / "a_fp32", [50.0, 70.0, 80.0])
    _run(parent / "b_w8a8g8", [45.0, 72.0, 79.25], scheme="w8a8g8", norm="range")
    _run(parent / "c_fp8", [40.0, 60.0, 78.5], scheme="fp8", loss_scale=[2.0**10, 2.0**9, 2.0**11])
    runs = find_runs([parent])
    assert [r.label for r in runs] == ["a_fp32", "b_w8a8g8", "c_fp8"]
    table = compare_table(runs)
    lines = table.splitlines()
    assert lines[2].startswith("| a_fp32 | fp32 | 3 | 80.00 | 80.00 | – |")
    assert "| b_w8a8g8 | w8a8g8, range BN int8 | 3 | 79.25 | 79.25 | -0.75 |" in table
    assert "| c_fp8 | fp8 | 3 | 78.50 | 78.50 | -1.50 | 3 min |" in table
    assert main(["compare", str(parent), "--labels", "FP32,8-bit,FP8",
                 "--out", str(tmp_path / "out" / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "| 8-bit |" in out and "| FP8 |" in out
    assert (tmp_path / "out" / "cmp.md").read_text().startswith("| run |")
    assert (tmp_path / "out" / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_language_model_runs_compare_perplexity(tmp_path):
    a = _run(tmp_path / "fp32", None, ppl=[300.0, 200.0])
    b = _run(tmp_path / "fp8", None, scheme="fp8", ppl=[310.0, 206.0])
    table = compare_table(find_runs([a, b]))
    assert "final test ppl" in table and "| fp8 | fp8 | 2 | 206.00 | 206.00 | +3.0 % |" in table


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    a = _run(tmp_path / "a", [10.0])
    lm = _run(tmp_path / "lm", None, ppl=[100.0])
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "holds no metrics.json" in capsys.readouterr().err
    assert main(["compare", str(a), "--labels", "x,y"]) == 2
    assert "--labels names 2 runs but 1" in capsys.readouterr().err
    assert main(["compare", str(a), str(lm)]) == 2
    assert "cannot compare language-model runs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one run"):
        compare_table([])
