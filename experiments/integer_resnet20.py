"""Integer-only CIFAR-10 ResNet-20 (issue 10, item 7): accuracy and agreement on the test set.

For a W8A8 QAT checkpoint and a post-training quantized twin of an FP32 checkpoint (lowbit's
W8A8 fake quantizers calibrated on training images), on every test image:

* top-1 of the FP32 model (PyTorch and ONNX Runtime), of ONNX Runtime's own static int8 QDQ
  quantization of it (``quantize_static``, a peer), and per quantized model of the training-time
  fake-quant model (float32), the integer model's float64 simulation with exact requantization
  (``IntegerModel.simulate``), the integer-only model, and lowbit's two ONNX exports in ONNX
  Runtime (integer operators; QOperator with ``QLinearConv``);
* integer vs simulation: output elements that differ (0 when the integer rules are right);
* integer vs fake-quant: images whose prediction differs, the largest logit difference, and per
  quantized layer the input codes that differ (float32 rounding in the fake-quant model);
* ONNX Runtime vs lowbit: logits that differ (integer style), predictions and per-layer codes
  (QOperator style, float32 requantization scales);
* the bit accounting of every requantization (``IntegerModel.summary``: shift ``k``, bits of
  ``M`` and ``C``, worst-case ``|M·x + C|``);
* how often each requantization scheme of today's runtimes disagrees with the exact result on
  the model's real accumulators (``scheme_disagreements`` of
  ``benchmarks/bench_integer_model.py``, on test images);
* whether a model from ``lowbit.ptq.quantize_model`` converts (the error if not).

Writes ``experiments/results/integer_resnet20.json`` and ``.md``. Usage (one thread, niced):

    OMP_NUM_THREADS=1 nice -n 5 python experiments/integer_resnet20.py \\
        [--qat CKPT] [--fp32 CKPT] [--data-root DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit import nn as lnn
from lowbit.integer import IntegerConversionError, IntegerModel, to_integer
from lowbit.integer.convert import checkpoint_model
from lowbit.integer.onnx_export import export_onnx, onnx_session

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_integer_model as bench  # noqa: E402  (reused: scheme_disagreements, ort_models)

SCHEME_NAMES = {
    "certified": "exact certified fixed point (lowbit: M, C, shift k, tie correction)",
    "float64": "float64 multiply-add, round half to even",
    "float32": "float32 multiply-add (PyTorch quantized BatchNorm)",
    "float32_int_bias": "float32 scale, int32 bias (FBGEMM, ONNX Runtime)",
    "gemmlowp": "Q31 multiplier, two roundings (TFLite / gemmlowp)",
    "tflite_single_rounding": "Q31 multiplier, one rounding (TFLITE_SINGLE_ROUNDING)",
    "divisor_2_24": "fixed divisor 2^24 (research stacks)",
}


# ------------------------------------------------------------------------------- models
def ptq_w8a8(fp32: torch.nn.Module, task: Any, images: int, seed: int) -> torch.nn.Module:
    """lowbit's W8A8 fake quantizers on the FP32 model, observers calibrated on ``images``
    un-augmented training images in a seeded order (no training)."""
    from lowbit.data import BatchLoader

    fq = lnn.convert(fp32, "w8a8")
    loader = BatchLoader(task.train_loader.dataset, 128, shuffle=True, augment=None, seed=seed)
    lnn.set_calibrating(fq, True)
    seen = 0
    with torch.no_grad():
        for x, _ in loader:
            fq(x[: images - seen])
            seen += min(x.shape[0], images - seen)
            if seen >= images:
                break
    lnn.set_calibrating(fq, False)
    return fq.eval()


def try_lowbit_ptq(fp32: torch.nn.Module, task: Any, example: torch.Tensor) -> dict[str, Any]:
    """Does a ``lowbit.ptq.quantize_model`` model (8 bits, no clipping/allocation/correction:
    its simplest form) convert to an integer model? The error says why not."""
    from lowbit.data import BatchLoader
    from lowbit.ptq import quantize_model

    loader = BatchLoader(task.train_loader.dataset, 128, shuffle=True, augment=None, seed=0)
    q, _ = quantize_model(fp32, loader, w_bits=8, a_bits=8, clip="minmax", bit_alloc=False,
                          bias_correction=False, num_samples=256, per_channel_acts=False)
    try:
        to_integer(q, example_input=example)
    except IntegerConversionError as exc:
        return {"converts": False, "error": str(exc)}
    return {"converts": True, "error": None}


# ----------------------------------------------------------------------------- measuring
def _act_codes(fq: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Fake-quant logits and the integer codes each quantized layer feeds itself."""
    codes, handles = {}, []
    for name, mod in lnn.quantized_modules(fq):
        def hook(m, inp, out, name=name):
            codes[name] = (torch.round(out.double() / m.scale.double()) + m.zero_point).short()
        handles.append(mod.act_quant.register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = fq(x)
    finally:
        for h in handles:
            h.remove()
    return logits, codes


def quantized_shortcuts(fq: torch.nn.Module) -> torch.nn.Module:
    """A copy of the fake-quant ResNet whose residual shortcuts add the block input as the
    block's first layer quantizes it (what the integer model adds: the only integers there
    are) instead of the float value; everything else stays float32."""
    from lowbit.models.resnet_cifar import BasicBlock

    fq = copy.deepcopy(fq)
    for b in fq.modules():
        if isinstance(b, BasicBlock):
            b.shortcut.register_forward_pre_hook(lambda mod, inp, b=b: (b.conv1.act_quant(inp[0]),))
    return fq


def _grid_nodes(im: IntegerModel) -> list:
    return [n for n in im.nodes[1:-1] if n.requant is not None
            and n.requant.requantizer.dtype in (torch.int8, torch.uint8)]


def _count(store: dict, name: str, a: np.ndarray, b: np.ndarray) -> None:
    d = np.abs(a.astype(np.int64) - b.astype(np.int64))
    r = store.setdefault(name, {"differ": 0, "elements": 0, "max_abs": 0})
    r["differ"] += int((d > 0).sum())
    r["elements"] += int(d.size)
    r["max_abs"] = max(r["max_abs"], int(d.max()) if d.size else 0)


@torch.no_grad()
def measure(fq: torch.nn.Module, im: IntegerModel, loader: Any, folder: Path, tag: str,
            limit: int | None, detail: int = 100, chunk: int = 250) -> dict[str, Any]:
    """One pass over the test set: every accuracy and agreement count of one quantized model.

    Every image: the fake-quant model (float32, and with quantized shortcuts), the integer
    model, its simulation, both ONNX Runtime exports. The per-layer code comparisons (and the
    float64 fake-quant model) run on the first ``detail`` images of each loader batch (the
    test set is class-sorted: this spreads them over the classes). Work is done ``chunk``
    images at a time to bound memory.
    """
    files = {style: export_onnx(im, folder / f"{tag}_{style}.onnx", style=style,
                                intermediates=style == "qoperator")
             for style in ("integer", "qoperator")}
    sess = {k: onnx_session(v, threads=1) for k, v in files.items()}
    q_names = [o.name for o in sess["qoperator"].get_outputs()]
    grid = _grid_nodes(im)
    fq_q = quantized_shortcuts(fq)
    fq_q64 = copy.deepcopy(fq_q).double()
    keys = ("fake_quant", "fake_quant_qshortcut", "simulation", "integer", "ort_integer",
            "ort_qoperator")
    correct = dict.fromkeys(keys, 0)
    pred_differ = dict.fromkeys(("fake_quant", "fake_quant_qshortcut", "ort_qoperator",
                                 "detail_fake_quant_qshortcut_f64"), 0)
    n = n_detail = sim_differ = sim_elems = ort_int_differ = ort_int_elems = 0
    worst_logit = 0.0
    layers: dict[str, dict] = {"fake_quant": {}, "fake_quant_qshortcut": {},
                               "fake_quant_qshortcut_f64": {}, "ort_qoperator": {}}
    t0 = time.perf_counter()
    for xb, yb in loader:
        if limit is not None and n >= limit:
            break
        if limit is not None:
            xb, yb = xb[: limit - n], yb[: limit - n]
        for c0 in range(0, xb.shape[0], chunk):
            x, y = xb[c0:c0 + chunk], yb[c0:c0 + chunk]
            with_detail = c0 == 0 and detail > 0
            if with_detail:
                x_d = x[:detail]
            q = im.quantize_input(x)
            out = im.run_integer(q)
            logits = im.dequantize_output(out)
            pred = logits.argmax(1)
            sim = im.simulate(x)
            sim_differ += int((sim != out.to(torch.int64)).sum())
            sim_elems += sim.numel()
            correct["simulation"] += int((im.dequantize_output(sim).argmax(1) == y).sum())
            correct["integer"] += int((pred == y).sum())
            for key, model in (("fake_quant", fq), ("fake_quant_qshortcut", fq_q)):
                f = model(x)
                correct[key] += int((f.argmax(1) == y).sum())
                pred_differ[key] += int((f.argmax(1) != pred).sum())
                if key == "fake_quant":
                    worst_logit = max(worst_logit,
                                      float((f.double() - logits.double()).abs().max()))
            xn = x.numpy()
            o_int = sess["integer"].run(["logits"], {"input": xn})[0]
            ort_int_differ += int((o_int != logits.numpy()).sum())
            ort_int_elems += o_int.size
            correct["ort_integer"] += int((o_int.argmax(1) == y.numpy()).sum())
            o_q = sess["qoperator"].run(["logits"], {"input": xn})[0]
            correct["ort_qoperator"] += int((o_q.argmax(1) == y.numpy()).sum())
            pred_differ["ort_qoperator"] += int((o_q.argmax(1) != pred.numpy()).sum())
            n += y.shape[0]
            if not with_detail:
                continue
            # per-layer codes on the detail images
            qd = im.quantize_input(x_d)
            out_d, vals = im.run_integer(qd, return_values=True)
            vals[im.nodes[0].output] = qd
            pred_d = im.dequantize_output(out_d).argmax(1)
            runs = {"fake_quant": _act_codes(fq, x_d)[1],
                    "fake_quant_qshortcut": _act_codes(fq_q, x_d)[1]}
            h_logits, runs["fake_quant_qshortcut_f64"] = _act_codes(fq_q64, x_d.double())
            pred_differ["detail_fake_quant_qshortcut_f64"] += int((h_logits.argmax(1)
                                                                    != pred_d).sum())
            for key, codes in runs.items():
                for node in im.nodes:
                    if node.op in ("conv2d", "linear"):
                        _count(layers[key], node.name, codes[node.name].numpy(),
                               vals[node.inputs[0]].numpy())
            o_all = dict(zip(q_names, sess["qoperator"].run(None, {"input": x_d.numpy()})))
            for node in grid:
                _count(layers["ort_qoperator"], node.name, o_all[node.output],
                       vals[node.output].numpy())
            n_detail += x_d.shape[0]
            del vals, runs, o_all
        print(f"  {tag}: {n} images, {time.perf_counter() - t0:.0f} s", flush=True)
    return {
        "images": n,
        "detail_images": n_detail,
        "top1": {k: 100.0 * v / n for k, v in correct.items()},
        "integer_vs_simulation": {"elements_differing": sim_differ, "elements": sim_elems},
        "integer_vs_fake_quant": {"predictions_differing": pred_differ["fake_quant"],
                                  "rate": pred_differ["fake_quant"] / n,
                                  "max_abs_logit_diff": worst_logit,
                                  "layer_codes": layers["fake_quant"]},
        "integer_vs_fake_quant_qshortcut": {
            "predictions_differing": pred_differ["fake_quant_qshortcut"],
            "rate": pred_differ["fake_quant_qshortcut"] / n,
            "layer_codes": layers["fake_quant_qshortcut"]},
        "integer_vs_fake_quant_qshortcut_f64": {
            "predictions_differing_detail": pred_differ["detail_fake_quant_qshortcut_f64"],
            "layer_codes": layers["fake_quant_qshortcut_f64"]},
        "ort_integer_vs_lowbit": {"logits_differing": ort_int_differ,
                                  "elements": ort_int_elems},
        "ort_qoperator_vs_lowbit": {"predictions_differing": pred_differ["ort_qoperator"],
                                    "rate": pred_differ["ort_qoperator"] / n,
                                    "layer_codes": layers["ort_qoperator"]},
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def top1(fn: Any, loader: Any, limit: int | None) -> float:
    n = c = 0
    for x, y in loader:
        if limit is not None and n >= limit:
            break
        if limit is not None:
            x, y = x[: limit - n], y[: limit - n]
        c += int((torch.as_tensor(fn(x)).argmax(1) == y).sum())
        n += y.shape[0]
    return 100.0 * c / n


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _checkpoint_info(path: str) -> dict[str, Any]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    return {"path": path, "epoch": ck.get("epoch"), "best_metric": ck.get("best_metric"),
            "scheme": ck["config"]["quant"]["scheme"], "recipe": ck["config"].get("name")}


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qat", default="/tmp/lbruns/c10_w8a8_e4/model_best.pt")
    ap.add_argument("--fp32", default="/tmp/lbruns/c10_fp32_e4/model_best.pt")
    ap.add_argument("--data-root", default="/work/shared/datasets")
    ap.add_argument("--ptq-images", type=int, default=1024,
                    help="training images that calibrate the PTQ model")
    ap.add_argument("--scheme-images", type=int, default=16,
                    help="test images whose accumulators feed the scheme table")
    ap.add_argument("--limit", type=int, default=None,
                    help="the first N test images in loader order (class-sorted: for quick "
                         "checks only)")
    ap.add_argument("--eval-limit", type=int, default=0,
                    help="a fixed random subset of N test images (data.eval_limit); "
                         "default: all")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--part", choices=["all", "qat", "ptq"], default="all",
                    help="measure one part (FP32 and QAT, or PTQ) into integer_resnet20.<part>"
                         ".json, to run the two in parallel; --merge joins them")
    ap.add_argument("--merge", action="store_true",
                    help="join the two part files in --out into integer_resnet20.{json,md}")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite the .md from the .json in --out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        res = json.loads((out / "integer_resnet20.qat.json").read_text())
        ptq = json.loads((out / "integer_resnet20.ptq.json").read_text())
        res["models"].update(ptq["models"])
        res["meta"]["command"] = [res["meta"]["command"], ptq["meta"]["command"]]
        (out / "integer_resnet20.json").write_text(json.dumps(res, indent=1))
    if args.markdown_only or args.merge:
        res = json.loads((out / "integer_resnet20.json").read_text())
        (out / "integer_resnet20.md").write_text(markdown(res))
        return res
    torch.set_num_threads(1)
    torch.manual_seed(0)
    over = [f"data.root={args.data_root}", f"data.eval_limit={args.eval_limit}"]
    folder = Path(tempfile.mkdtemp(prefix="lowbit_intreport_"))

    fp32, task = checkpoint_model(args.fp32, over)
    loader = task.eval_loader
    example = next(iter(loader))[0][:1]
    scheme_x = next(iter(loader))[0][: args.scheme_images]

    models: dict[str, torch.nn.Module] = {}
    if args.part in ("all", "qat"):
        models["QAT W8A8"] = checkpoint_model(args.qat, over)[0]
    if args.part in ("all", "ptq"):
        models["PTQ W8A8"] = ptq_w8a8(fp32, task, args.ptq_images, seed=0)
    res: dict[str, Any] = {}
    calib = []
    from lowbit.data import BatchLoader

    for i, (x, _) in enumerate(BatchLoader(task.train_loader.dataset, 128, shuffle=True,
                                           augment=None, seed=0)):
        if i >= max(1, args.ptq_images // 128):
            break
        calib.append(x)
    ims: dict[str, IntegerModel] = {}
    convert_s: dict[str, float] = {}
    for name, fq in models.items():
        t = time.perf_counter()
        ims[name] = to_integer(fq, example_input=example)
        convert_s[name] = time.perf_counter() - t
    if args.part in ("all", "qat"):
        print("FP32 ...", flush=True)
        res["fp32"] = {"top1_torch": top1(fp32, loader, args.limit)}
        ort_files = bench.ort_models(fp32, ims["QAT W8A8"], calib, folder)
        for key in ("ORT fp32", "ORT int8 (quantize_static)"):
            if key in ort_files:
                s = onnx_session(ort_files[key], threads=1)
                res["fp32"][key] = top1(lambda x, s=s: s.run(None, {"input": x.numpy()})[0],
                                        loader, args.limit)
        print(res["fp32"], flush=True)

    res["models"] = {}
    for i, (name, fq) in enumerate(models.items()):
        im = ims[name]
        r = measure(fq, im, loader, folder, f"m{i}{args.part}", args.limit)
        r["to_integer_seconds"] = convert_s[name]
        r["schemes"] = bench.scheme_disagreements(im, scheme_x)
        r["bit_accounting"] = im.summary()
        r["summary_markdown"] = im.summary_markdown()
        res["models"][name] = r
        print(name, json.dumps(r["top1"]), flush=True)
    if args.part in ("all", "qat"):
        res["lowbit_ptq"] = try_lowbit_ptq(fp32, task, example)

    res["meta"] = {
        "command": "OMP_NUM_THREADS=1 nice -n 5 python experiments/integer_resnet20.py "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "commit": _git_commit(), "torch": torch.__version__, "python": platform.python_version(),
        "qat": _checkpoint_info(args.qat), "fp32": _checkpoint_info(args.fp32),
        "ptq": {"source": args.fp32, "calibration_images": args.ptq_images,
                "scheme": "w8a8 (lowbit.nn.convert defaults), observers calibrated"},
        "scheme_images": args.scheme_images,
        "test_images": next(iter(res["models"].values()))["images"],
    }
    try:
        import onnxruntime

        res["meta"]["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover - the script needs it anyway
        pass
    out.mkdir(parents=True, exist_ok=True)
    if args.part != "all":
        (out / f"integer_resnet20.{args.part}.json").write_text(json.dumps(res, indent=1))
        print(f"wrote {out / f'integer_resnet20.{args.part}.json'}")
        return res
    (out / "integer_resnet20.json").write_text(json.dumps(res, indent=1))
    (out / "integer_resnet20.md").write_text(markdown(res))
    print(f"wrote {out / 'integer_resnet20.md'}")
    return res


def _pct(a: int, b: int) -> str:
    return f"{a} / {b} ({100.0 * a / max(b, 1):.3g} %)"


def markdown(res: dict[str, Any]) -> str:
    meta, fp = res["meta"], res["fp32"]
    names = list(res["models"])
    cmds = meta["command"] if isinstance(meta["command"], list) else [meta["command"]]
    lines = [
        "# Integer-only CIFAR-10 ResNet-20",
        "",
        "Generated by " + " and ".join(f"`{c.strip()}`" for c in cmds)
        + (" (run in parallel, then `python experiments/integer_resnet20.py --merge`)"
           if len(cmds) > 1 else "") + f" at commit {meta['commit']} (torch "
        f"{meta['torch']}, onnxruntime {meta.get('onnxruntime', '-')}). "
        f"{meta['test_images']} CIFAR-10 test images. QAT: `{meta['qat']['path']}` "
        f"(epoch {meta['qat']['epoch']}); FP32 and the PTQ source: `{meta['fp32']['path']}` "
        f"(epoch {meta['fp32']['epoch']}); PTQ: W8A8 fake quantizers on the FP32 model, "
        f"observers calibrated on {meta['ptq']['calibration_images']} training images.",
        "",
        "## Top-1 accuracy (%)",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        "| test images | " + " | ".join(str(res["models"][m]["images"]) for m in names) + " |",
        f"| FP32 (PyTorch) | {fp['top1_torch']:.2f} |" + " |" * (len(names) - 1),
    ]
    if "ORT fp32" in fp:
        lines.append(f"| FP32 (ONNX Runtime) | {fp['ORT fp32']:.2f} |" + " |" * (len(names) - 1))
    if "ORT int8 (quantize_static)" in fp:
        lines.append(f"| ONNX Runtime's own int8 QDQ (quantize_static of the FP32 model) | "
                     f"{fp['ORT int8 (quantize_static)']:.2f} |" + " |" * (len(names) - 1))
    rows = [("fake-quant (training-time float32 model)", "fake_quant"),
            ("fake-quant, quantized shortcuts (float32)", "fake_quant_qshortcut"),
            ("simulation (float64, exact requantization)", "simulation"),
            ("integer-only (lowbit IntegerModel)", "integer"),
            ("ONNX Runtime, integer operators export", "ort_integer"),
            ("ONNX Runtime, QOperator export (QLinearConv)", "ort_qoperator")]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(
            f"{res['models'][m]['top1'][key]:.2f}" for m in names) + " |")
    lines += ["", "## Agreement", "", "| | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]

    def row(label: str, fn: Any) -> None:
        lines.append(f"| {label} | " + " | ".join(fn(res["models"][m]) for m in names) + " |")

    row("integer vs simulation: output elements differing",
        lambda r: _pct(r["integer_vs_simulation"]["elements_differing"],
                       r["integer_vs_simulation"]["elements"]))
    row("integer vs fake-quant: predictions differing",
        lambda r: _pct(r["integer_vs_fake_quant"]["predictions_differing"], r["images"]))
    row("integer vs fake-quant: largest logit difference",
        lambda r: f"{r['integer_vs_fake_quant']['max_abs_logit_diff']:.3g}")
    row("integer vs fake-quant: layer input codes differing (detail images, all layers)",
        lambda r: _pct(sum(v["differ"] for v in r["integer_vs_fake_quant"]["layer_codes"]
                           .values()),
                       sum(v["elements"] for v in r["integer_vs_fake_quant"]["layer_codes"]
                           .values())))
    row("integer vs fake-quant: largest code difference (steps)",
        lambda r: str(max(v["max_abs"] for v in r["integer_vs_fake_quant"]["layer_codes"]
                          .values())))
    row("integer vs fake-quant with quantized shortcuts: predictions differing",
        lambda r: _pct(r["integer_vs_fake_quant_qshortcut"]["predictions_differing"],
                       r["images"]))
    row("integer vs fake-quant with quantized shortcuts, float64: predictions differing "
        "(detail images)",
        lambda r: _pct(r["integer_vs_fake_quant_qshortcut_f64"]
                       ["predictions_differing_detail"], r["detail_images"]))
    for key, label in (("integer_vs_fake_quant_qshortcut", "quantized shortcuts"),
                       ("integer_vs_fake_quant_qshortcut_f64", "quantized shortcuts, float64")):
        row(f"integer vs fake-quant with {label}: layer input codes differing (detail images)",
            lambda r, key=key: _pct(sum(v["differ"] for v in r[key]["layer_codes"].values()),
                                    sum(v["elements"] for v in r[key]["layer_codes"].values())))
        row(f"integer vs fake-quant with {label}: largest code difference (steps)",
            lambda r, key=key: str(max(v["max_abs"] for v in r[key]["layer_codes"].values())))
    row("ONNX Runtime integer export vs lowbit: logits differing",
        lambda r: _pct(r["ort_integer_vs_lowbit"]["logits_differing"],
                       r["ort_integer_vs_lowbit"]["elements"]))
    row("ONNX Runtime QOperator vs lowbit: predictions differing",
        lambda r: _pct(r["ort_qoperator_vs_lowbit"]["predictions_differing"], r["images"]))
    row("ONNX Runtime QOperator vs lowbit: 8-bit codes differing (detail images)",
        lambda r: _pct(sum(v["differ"] for v in r["ort_qoperator_vs_lowbit"]["layer_codes"]
                           .values()),
                       sum(v["elements"] for v in r["ort_qoperator_vs_lowbit"]["layer_codes"]
                           .values())))
    row("ONNX Runtime QOperator vs lowbit: largest code difference (steps)",
        lambda r: str(max(v["max_abs"] for v in r["ort_qoperator_vs_lowbit"]["layer_codes"]
                          .values())))
    lines += ["", "Where the fake-quant model and the integer model part: (1) the integer "
              "model adds the *quantized* block input on each residual shortcut (the only "
              "integers there are), the training-time fake-quant model the float one: most of "
              "the disagreement. The rows 'with quantized shortcuts' quantize the fake-quant "
              "model's shortcut the same way (a forward pre-hook). (2) float32 rounding in the "
              "fake-quant model moves a value across a rounding boundary now and then: the "
              "float64 rows remove it. (3) what is left is the integer model's own "
              "approximation at the residual add: the shortcut is rounded into the branch's "
              "accumulator units (`convert._Converter.on_add`, at most half a unit, a small "
              "fraction of an output step), so the sum is not the exactly rounded real sum "
              "where it lies that close to a rounding boundary. Before the first residual add "
              "the float64 model and the integer model agree code for code; every flip then "
              "moves many outputs of the next layer, so the rates grow with depth while "
              "predictions rarely change. The simulation follows the integer model's own "
              "rules (shortcut rounding included) and matches it bit for bit. The QOperator "
              "export requantizes with float32 scales as ONNX Runtime does.", "",
              f"Input codes of each quantized layer differing from the integer model's "
              f"(fraction; largest difference in steps), on the detail images (the first "
              f"{res['models'][names[0]]['detail_images'] // 10} of each block of 1,000 test "
              "images, spread over the classes):", "",
              "| layer | " + " | ".join(f"{m}: fake-quant | {m}: quantized shortcuts | "
                                        f"{m}: quantized shortcuts, float64"
                                        for m in names) + " |",
              "|---|" + "---|---|---|" * len(names)]
    first = res["models"][names[0]]["integer_vs_fake_quant"]["layer_codes"]
    for layer in first:
        cells = []
        for m in names:
            for key in ("integer_vs_fake_quant", "integer_vs_fake_quant_qshortcut",
                        "integer_vs_fake_quant_qshortcut_f64"):
                v = res["models"][m][key]["layer_codes"][layer]
                cells.append(f"{v['differ'] / max(v['elements'], 1):.2e} ({v['max_abs']})")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += ["",
              "## Requantization schemes on the model's accumulators", "",
              f"Every certified requantization of the integer model, every channel, the real "
              f"accumulator values of {meta['scheme_images']} test images; outputs differing "
              "from the exactly rounded value (round half to even). Schemes: "
              "`lowbit.integer.requant`; counts from `scheme_disagreements` in "
              "`benchmarks/bench_integer_model.py`.", "",
              "| scheme | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key in res["models"][names[0]]["schemes"]:
        cells = []
        for m in names:
            v = res["models"][m]["schemes"][key]
            cells.append(f"{v['differ']} of {v['cases']} ({v['differ'] / max(v['cases'], 1):.2e})")
        lines.append(f"| {SCHEME_NAMES.get(key, key)} | " + " | ".join(cells) + " |")
    for m in names:
        r = res["models"][m]
        acc = r["bit_accounting"]
        cert = [a for a in acc if a["certified"]]
        lines += ["", f"## Bit accounting: {m}", "",
                  f"{len(acc)} requantizations ({len(cert)} certified fixed point, the rest "
                  "exact integer maps); k: shift; M, C: bits of the multiplier and offset; "
                  "worst abs(M·x+C): bits of the largest intermediate over the proven input "
                  f"range. to_integer took {r['to_integer_seconds']:.1f} s.", "",
                  r["summary_markdown"].rstrip()]
    lp = res["lowbit_ptq"]
    lines += ["", "## lowbit.ptq models", "",
              "`lowbit.ptq.quantize_model` at 8 bits (min/max ranges, no bit allocation, no "
              "bias correction, per-tensor activations): "
              + ("converts." if lp["converts"] else f"does not convert: `{lp['error']}`"), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
