"""Data-parallel training: `torchrun --nproc_per_node 2 -m lowbit train ...` on CPU (gloo).

Each process saves its final weights through a callback named in the recipe
(``train.callbacks=["test_ddp:SaveRankWeights"]``); the test checks that the two processes end
with identical parameters and buffers, and that only rank 0 wrote the run folder.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


class SaveRankWeights:
    """Callback: after the last epoch, save this process's state dict to $LOWBIT_TEST_DDP_DIR."""

    def on_epoch_end(self, trainer, metrics):
        if metrics["epoch"] == trainer.cfg["epochs"]:
            out = Path(os.environ["LOWBIT_TEST_DDP_DIR"])
            torch.save({k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
                       out / f"rank{trainer.dist.rank}.pt")
            torch.save({"steps": trainer.step, "val_top1": metrics["val_top1"]},
                       out / f"info{trainer.dist.rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_ends_with_identical_weights(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ)
    env.update({
        "PYTHONPATH": os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]),
        "LOWBIT_TEST_DDP_DIR": str(tmp_path),
        "OMP_NUM_THREADS": "1",
    })
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "lowbit", "train", "digits", "variant=fp32", "epochs=2", "data.batch_size=32",
        "progress=false", 'train.callbacks=["test_ddp:SaveRankWeights"]', "--out", str(run_dir),
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # both processes took the same number of steps: half the single-process count each
    i0, i1 = torch.load(tmp_path / "info0.pt"), torch.load(tmp_path / "info1.pt")
    assert i0 == i1
    from lowbit.data import get_dataset

    per_rank = math.ceil(len(get_dataset("digits", "train").labels) / 2)
    assert i0["steps"] == 2 * math.ceil(per_rank / 32)
    # rank 0 wrote the run (the variant runs in <out>/fp32); the checkpoint holds its weights
    ckpt = torch.load(run_dir / "fp32" / "last.pt", weights_only=False)
    for k in a:
        assert torch.equal(ckpt["model"][k], a[k]), k
    assert ckpt["epoch"] == 2
    # the run is well above chance (10 classes) after 2 epochs of data-parallel training
    assert i0["val_top1"] > 50
