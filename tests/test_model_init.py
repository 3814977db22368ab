"""model.init: start a run (QAT fine-tuning) or a PTQ from trained float weights."""

from __future__ import annotations

import pytest
import torch

from lowbit import config as config_mod
from lowbit.ptq import run_ptq
from lowbit.train import build_model, build_task, evaluate, train
from lowbit.train.checkpoint import CheckpointError, load_checkpoint


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
    """The default digits recipe's FP32 variant, two epochs."""
    out = tmp_path_factory.mktemp("fp32")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train("digits", ["variant=fp32", "epochs=2", "progress=false"], out_dir=out, log=None)
    finally:
        torch.set_num_threads(threads)
    return out


def _cfg(*overrides: str) -> dict:
    return config_mod.split_variants(config_mod.resolve("digits", list(overrides)))[0][1]


def test_qat_model_starts_from_the_float_weights(fp32_run):
    ckpt = load_checkpoint(fp32_run / "model_best.pt")
    cfg = _cfg("variant=w8a8", f"model.init={fp32_run}")
    task = build_task(cfg)
    model = build_model(cfg, task, init_weights=True)
    state = model.state_dict()
    float_keys = [k for k in ckpt["model"] if not k.endswith("num_batches_tracked")]
    assert float_keys
    for k in float_keys:
        assert torch.equal(state[k], ckpt["model"][k]), k
    # without init_weights (a checkpoint being restored) the weights are the random ones
    fresh = build_model(cfg, task).state_dict()
    assert not torch.equal(fresh[float_keys[0]], ckpt["model"][float_keys[0]])


def test_qat_fine_tuning_keeps_the_float_accuracy(fp32_run, tmp_path):
    fp32 = evaluate(fp32_run / "model_best.pt")["val_top1"]
    assert fp32 > 80.0
    # one epoch at learning rate 0: only the quantizers' ranges and BN statistics move
    r = train("digits", ["variant=w8a8", "epochs=1", "optim.lr=0", "progress=false",
                         f"model.init={fp32_run / 'model_best.pt'}"], out_dir=tmp_path, log=None)
    qat = r.metrics[-1]["val_top1"]
    assert qat >= fp32 - 3.0
    # the same run from random weights stays near chance: the init did the work
    r0 = train("digits", ["variant=w8a8", "epochs=1", "optim.lr=0", "progress=false"],
               out_dir=tmp_path / "scratch", log=None)
    scratch = r0.metrics[-1]["val_top1"]
    assert scratch < 40.0


def test_state_dict_file_in_torchvision_and_ddp_layouts(fp32_run, tmp_path):
    ckpt = load_checkpoint(fp32_run / "model_best.pt")
    plain = {k: v for k, v in ckpt["model"].items() if not k.endswith("num_batches_tracked")}
    for name, obj in [("plain.pth", plain),
                      ("wrapped.pt", {"state_dict": {"module." + k: v for k, v in plain.items()},
                                      "epoch": 3})]:
        torch.save(obj, tmp_path / name)
        cfg = _cfg("variant=fp32", f"model.init={tmp_path / name}")
        model = build_model(cfg, build_task(cfg), init_weights=True)
        for k, v in plain.items():
            assert torch.equal(model.state_dict()[k], v), (name, k)


def test_bad_init_weights_are_clear_errors(fp32_run, tmp_path):
    cfg = _cfg("variant=fp32", f"model.init={tmp_path / 'nope.pt'}")
    task = build_task(cfg)
    with pytest.raises(CheckpointError, match="model.init.*does not exist"):
        build_model(cfg, task, init_weights=True)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cfg = _cfg("variant=fp32", f"model.init={tmp_path / 'junk.pt'}")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_model(cfg, task, init_weights=True)
    # weights of another model: the missing and unexpected names are listed
    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    cfg = _cfg("variant=fp32", f"model.init={tmp_path / 'other.pt'}")
    with pytest.raises(CheckpointError, match="missing .*unexpected .*encoder.weight"):
        build_model(cfg, task, init_weights=True)
    # a quantized checkpoint is not float weights
    train("digits", ["variant=w8a8", "epochs=1", "progress=false", "data.limit=256"],
          out_dir=tmp_path / "q", log=None)
    cfg = _cfg("variant=fp32", f"model.init={tmp_path / 'q'}")
    with pytest.raises(CheckpointError, match="needs float weights.*w8a8"):
        build_model(cfg, task, init_weights=True)


def test_ptq_of_a_recipe_with_init_weights(fp32_run, tmp_path):
    fp32 = evaluate(fp32_run / "model_best.pt")["val_top1"]
    r = run_ptq("digits", overrides=[f"model.init={fp32_run / 'model_best.pt'}"],
                out_dir=tmp_path, w_bits=8, a_bits=8, num_samples=256)
    assert r["fp32_top1"] == pytest.approx(fp32)
    assert r["top1"] >= fp32 - 1.0
    assert evaluate(r["checkpoint"])["val_top1"] == pytest.approx(r["top1"])
    with pytest.raises(ValueError, match="model.init=WEIGHTS"):
        run_ptq("digits", out_dir=tmp_path / "x", w_bits=8, a_bits=8)
    with pytest.raises(FileNotFoundError, match="model.init.*does not exist"):
        run_ptq("imagenet_resnet18_fp32", overrides=[f"model.init={tmp_path / 'none.pth'}"],
                out_dir=tmp_path / "y")  # named before any (absent) ImageNet is looked for
