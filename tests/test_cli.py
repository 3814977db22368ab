"""The `lowbit` command, run in-process through lowbit.cli.main([...]) on the built-in digits."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lowbit.cli import main
from lowbit.config import list_recipes
from lowbit.train import load_checkpoint

FAST = ["variant=fp32", "epochs=2", "progress=false"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A 2-epoch FP32 digits run, shared by the eval/resume/error tests."""
    out = tmp_path_factory.mktemp("digits")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the function-scoped one_thread
    try:
        assert main(["train", "digits", *FAST, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    return out


def test_default_run_fp32_vs_w8a8(tmp_path, capsys, monkeypatch):
    """`lowbit train` alone: digits, FP32 and W8A8 side by side, both far above chance."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "progress=false"]) == 0
    out = capsys.readouterr().out
    table = out[out.rindex("run "):]
    assert "fp32" in table and "w8a8" in table and "top-1" in table
    (run,) = list((tmp_path / "runs").glob("digits-*"))
    acc = {v: json.loads((run / v / "metrics.json").read_text())[-1]["val_top1"]
           for v in ("fp32", "w8a8")}
    # chance is 10 %; measured here: FP32 100.00 %, W8A8 99.44 % (8 epochs, seed 0)
    assert acc["fp32"] >= 95 and acc["w8a8"] >= 95, acc
    # W8A8 QAT lands within 3 points of its FP32 twin (measured gap: 0.56 points)
    assert abs(acc["fp32"] - acc["w8a8"]) <= 3, acc
    for v in ("fp32", "w8a8"):
        assert f"{acc[v]:.2f}%" in table
        ckpt = load_checkpoint(run / v / "last.pt")
        assert ckpt["config"]["quant"]["scheme"] == v and ckpt["epoch"] == 8


def test_recipes_lists_one_line_each(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [n for n, _ in list_recipes()]
    assert len(lines) == len(names) >= 5
    for line, name in zip(lines, names):
        assert line.startswith(name) and len(line.split(None, 1)[1]) > 10
    assert any("(default)" in line and line.startswith("digits") for line in lines)


def test_eval_reproduces_the_run_metrics(digits_run, capsys):
    final = json.loads((digits_run / "fp32" / "metrics.json").read_text())[-1]
    capsys.readouterr()
    assert main(["eval", str(digits_run / "fp32" / "last.pt")]) == 0
    out = capsys.readouterr().out
    assert f"{final['val_top1']:.2f}%" in out
    assert f"{final['val_loss']:.4f}" in out


def test_resume_extends_a_run(digits_run, tmp_path):
    import shutil

    run = tmp_path / "r"
    shutil.copytree(digits_run, run)
    assert main(["train", "digits", *FAST[:1], "epochs=3", "progress=false", "--resume",
                 "--out", str(run)]) == 0
    rows = json.loads((run / "fp32" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert load_checkpoint(run / "fp32")["epoch"] == 3


def test_resume_finds_newest_run_under_runs(digits_run, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(digits_run, tmp_path / "runs" / "digits-20990101-000000")
    assert main(["train", "digits", "variant=fp32", "epochs=3", "progress=false",
                 "--resume"]) == 0
    assert load_checkpoint(tmp_path / "runs" / "digits-20990101-000000" / "fp32")["epoch"] == 3


def _err(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.err


def test_user_errors_exit_2_with_one_clear_message(digits_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["train", "digitz"], "unknown recipe 'digitz'. Did you mean 'digits'?"),
        (["train", "digits", "optim.lrr=0.1"], "Did you mean 'optim.lr'?"),
        (["train", "digits", "optim.name=adamw"], "Did you mean 'adam'?"),
        (["train", "digits", "epochs=three"], "epochs must be an integer"),
        (["train", "digits", "oops"], "expected key=value"),
        (["train", "--resume"], "no checkpoint to resume"),
        (["train", "digits", "--resume", str(tmp_path / "nothing")], "no checkpoint to resume"),
        (["eval", str(tmp_path / "missing.pt")], "does not exist"),
        (["train", "digits", "variant=int4"], "variant 'int4' is not defined"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert msg in err, (argv, err)
        assert err.startswith("lowbit: error:") and err.count("\n") == 1, err


def test_checkpoint_from_another_model_is_refused(digits_run, capsys):
    argv = ["train", "digits", "variant=fp32", "model.name=mlp", "model.kwargs.in_shape=[1,8,8]",
            "progress=false", "--resume", str(digits_run / "fp32")]
    assert main(argv) == 2
    err = _err(capsys)
    assert "saved from model 'small_cnn' but this run builds 'mlp'" in err
    assert load_checkpoint(digits_run / "fp32")["epoch"] == 2  # untouched
    assert main(["eval", str(digits_run / "fp32"), "model.kwargs.width=8"]) == 2
    assert "does not fit model 'small_cnn'" in _err(capsys)


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"\x00" * 100)
    assert main(["eval", str(tmp_path)]) == 2
    assert "cannot read checkpoint" in _err(capsys)


def test_summary_prints_both_variants(capsys):
    pytest.importorskip("lowbit.nn")
    assert main(["summary", "digits"]) == 0
    out = capsys.readouterr().out
    assert "variant fp32" in out and "variant w8a8" in out
    assert "int8" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "train" in capsys.readouterr().out


def test_python_dash_m_lowbit():
    proc = subprocess.run([sys.executable, "-m", "lowbit", "recipes"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "digits" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "lowbit", "train", "nope"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown recipe 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_dataset_is_one_clear_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "mnist_mlp_fp32", f"data.root={tmp_path}", "--out", str(out)]) == 2
    err = _err(capsys)
    assert "train-images-idx3-ubyte" in err and "download" in err
    assert not out.exists()  # nothing half-written


def test_diverging_run_exits_1_and_says_why(tmp_path, capsys):
    argv = ["train", "digits", "variant=fp32", "optim.lr=1e6", "epochs=2", "progress=false",
            "--out", str(tmp_path)]
    assert main(argv) == 1
    err = _err(capsys)
    assert "training diverged: the loss became" in err and "optim.lr" in err
    assert not list(tmp_path.rglob("*.pt"))
