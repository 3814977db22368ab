"""Integer-only ResNet-20 (lowbit.to_integer) against its peers, timed in one process.

Models (CIFAR shapes 3x32x32, ResNet-20 with random weights and randomized BatchNorm, every
quantized model calibrated on the same random batches):

* ``fp32 eager``: the float model in PyTorch (the baseline of every ratio);
* ``lowbit int8``: the integer model of the W8A8 fake-quant model on the fused channels-last
  path (``backend="auto"``): each convolution (and residual block) on the fastest of its
  exact paths, timed once per layer and input shape in the warm-up (the choices are recorded
  in the JSON): ``lowbit int8 (AMX)``, lowbit's convolution on AMX-INT8 tiles with the
  fixed-point requantization and the residual add in its epilogue (``backend="amx"``; layers
  with fewer than 16 input channels on the VNNI loop); ``lowbit int8 (VNNI)``, the same
  kernel on AVX-512 VNNI (``backend="vnni"``); ``lowbit int8 (oneDNN)``, oneDNN's int8 convolution wherever its
  accumulators are certified below 2^24 (exact int32 sums returned in float32,
  ``lowbit.integer.ops.OnednnConv2d``), the compiled requantization after it
  (``backend="onednn"``); ``lowbit int8 (_int_mm)``, NHWC im2col + ``torch._int_mm`` and the
  same requantization (``backend="compiled"``); and the pure-torch kernels
  (``backend="torch"``);
* ``lowbit 4-bit``: the W4A4 model (4-bit weights and activations in the middle layers, 8-bit
  first/last), through the same int8 kernels (no packed 4-bit kernel);
* ``torch.ao x86``: ``prepare_fx``/``convert_fx`` with the x86 qconfig (FBGEMM/oneDNN int8);
* ``ORT fp32`` and ``ORT int8 (quantize_static)``: ONNX Runtime on the float model exported by
  ``torch.onnx.export`` and on onnxruntime's own static QDQ int8 quantization of it;
* ``ORT lowbit integer`` / ``ORT lowbit qoperator``: lowbit's two ONNX exports of the int8
  integer model (the integer-operator one is checked bit-exact against lowbit here).

Batch 1 and 128, 2 threads (``torch.set_num_threads``, ONNX Runtime ``intra_op_num_threads``),
threads waiting passively (``OMP_WAIT_POLICY=PASSIVE``, ONNX Runtime without spinning).
Rounds interleave the models so that a busy machine slows them alike; reported per model: the
median wall time of the rounds, the median CPU time (``time.process_time``, all threads; less
sensitive to other processes than wall time), and the median over rounds of the paired ratio
to torch.ao timed in the same round, with the load average before and after. Writes ``benchmarks/results/
integer_model.json`` and ``integer_model.md``.

Also measured: how often each requantization scheme of today's runtimes
(:data:`lowbit.integer.requant.SCHEMES`) disagrees with the exact result on this model's real
accumulators (every certified requantization, 8 random images), where lowbit's certified
fixed point never does; and the per-layer bit accounting of the W8A8 integer model.

Usage: ``python benchmarks/bench_integer_model.py [--rounds 15] [--quick]``.
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting starve each other on a shared, loaded machine (FP32
# ResNet-20 at batch 1 measured 35 ms spinning vs 3.6 ms passive here); every runtime below
# waits passively (ONNX Runtime: allow_spinning 0). Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from lowbit import models
from lowbit import nn as lnn
from lowbit.integer import to_integer

ROOT = Path(__file__).resolve().parent
ISSUE_MS = {"torch.ao x86": 10.0, "ORT int8 (quantize_static)": 12.3, "fp32 eager": 56.8}


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_float(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = models.create("resnet20")
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.rand(n, generator=g) * 0.4 - 0.2
            m.running_mean.data = torch.randn(n, generator=g) * 0.2
            m.running_var.data = torch.rand(n, generator=g) + 0.5
    return model.eval()


def lowbit_integer(model: torch.nn.Module, scheme: str, calib: list[torch.Tensor]):
    fq = lnn.convert(model, scheme, first_last="same" if scheme == "w8a8" else None)
    return to_integer(fq, calib)


def torch_ao(model: torch.nn.Module, calib: list[torch.Tensor]):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        torch.backends.quantized.engine = "x86"
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                              example_inputs=(calib[0],))
        with torch.no_grad():
            for x in calib:
                prepared(x)
        return convert_fx(prepared)


def ort_models(model: torch.nn.Module, im, calib: list[torch.Tensor], folder: Path) -> dict:
    """ONNX files: fp32 export, onnxruntime's static int8 QDQ, lowbit's two exports."""
    from lowbit.integer.onnx_export import export_onnx

    out = {}
    fp32 = folder / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(copy.deepcopy(model), (calib[0],), str(fp32), dynamo=False,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17)
    out["ORT fp32"] = fp32
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(calib)

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {"input": x.numpy()}

        q = folder / "ort_int8.onnx"
        quantize_static(str(fp32), str(q), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
        out["ORT int8 (quantize_static)"] = q
    except Exception as exc:  # report, keep going
        print(f"onnxruntime quantize_static failed: {exc}")
    out["ORT lowbit integer"] = export_onnx(im, folder / "lowbit_integer.onnx", style="integer")
    out["ORT lowbit qoperator"] = export_onnx(im, folder / "lowbit_qoperator.onnx",
                                              style="qoperator")
    return out


def scheme_disagreements(im, x: torch.Tensor) -> dict[str, dict[str, int]]:
    """Per scheme: cases (accumulator values of every channel of every certified
    requantization on ``x``) whose output differs from the exact one."""
    import torch.nn.functional as F

    from lowbit.integer.requant import SCHEMES, requantize

    q = im.quantize_input(x)
    _, vals = im.run_integer(q, return_values=True, backend="torch")
    vals[im.nodes[0].output] = q
    out = {k: {"differ": 0, "cases": 0} for k in ["certified", *SCHEMES]
           if k != "rounded_fixed_point"}
    for n in im.nodes[1:-1]:
        spec = n.requant
        if spec is None or spec.fixed_point is None:
            continue
        v = vals[n.inputs[0]].to(torch.float64)
        if n.op == "conv2d":
            a = n.attrs
            acc = F.conv2d(v - a["input_zero_point"], n.weight.double(), None, a["stride"],
                           a["padding"], a["dilation"], a["groups"])
        elif n.op == "linear":
            acc = F.linear(v - n.attrs["input_zero_point"], n.weight.double())
        else:
            acc = v
        acc = acc.to(torch.int64).movedim(1, 0).reshape(spec.channels, -1).numpy()
        for c in range(spec.channels):
            xs, counts = np.unique(acc[c], return_counts=True)
            one = type(spec)([spec.a[c]], [spec.b[c]], spec.input_zero_point, spec.zero_point,
                             spec.lo, spec.hi, spec.rounding, spec.input_bounds[c:c + 1],
                             spec.requantizer)
            exact = one.exact(xs[None, :])[0]
            rq = spec.requantizer
            x_in = torch.from_numpy(xs)
            if spec.input_clamp is not None:
                x_in = x_in.clamp(int(spec.input_clamp[c, 0]), int(spec.input_clamp[c, 1]))
            v = (x_in * int(rq.multiplier[c]) + int(rq.offset[c]))
            k, w = int(rq.shift[c]), int(rq.window[c])
            qv = v >> k
            tie = ((v & ((1 << k) - 1)) < w) & ((qv & 1) == 1)
            cert = (qv - tie.long() + rq.zero_point).clamp(rq.qmin, rq.qmax).numpy()
            out["certified"]["differ"] += int(counts[cert != exact].sum())
            out["certified"]["cases"] += int(counts.sum())
            for name in out:
                if name == "certified":
                    continue
                got = requantize(name, [spec.a[c]], [spec.b[c]], xs, (spec.lo, spec.hi),
                                 input_zero_point=spec.input_zero_point,
                                 output_zero_point=spec.zero_point)[0]
                out[name]["differ"] += int(counts[got != exact].sum())
                out[name]["cases"] += int(counts.sum())
    return out


def timed(fn, inner: int) -> tuple[float, float]:
    """Wall and CPU milliseconds per call, averaged over ``inner`` calls."""
    t, c = time.perf_counter(), time.process_time()
    for _ in range(inner):
        fn()
    return ((time.perf_counter() - t) / inner * 1000.0,
            (time.process_time() - c) / inner * 1000.0)


def onednn_convolutions(im) -> tuple[int, int]:
    """(convolutions the fused executor runs in oneDNN, convolutions in all)."""
    return len(im.onednn_layers()), sum(n.op == "conv2d" for n in im.nodes)


def vnni_available() -> bool:
    from lowbit.integer import _ext

    return _ext.vnni() is not None


def amx_available() -> bool:
    from lowbit.integer import _ext

    return _ext.vnni() is not None and _ext.vnni().amx_supported()


def chosen_paths(im, batch: int) -> dict[str, str]:
    """The path ``backend="auto"`` settled on for each fused layer at this batch size."""
    steps, _ = im._fused_plan()
    return {n.name: p for n, g in steps if g is not None and hasattr(g, "chosen")
            for key, p in g.chosen.items() if key[0][0] == batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 rounds, results to a temp folder")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite integer_model.md from integer_model.json")
    args = ap.parse_args()
    if args.markdown_only:
        data = json.loads((ROOT / "results" / "integer_model.json").read_text())
        (ROOT / "results" / "integer_model.md").write_text(markdown(data["meta"],
                                                                    data["results"]))
        return
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    model = build_float()
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(32, 3, 32, 32, generator=g) for _ in range(4)]
    t0 = time.perf_counter()
    im8 = lowbit_integer(model, "w8a8", calib)
    convert_s = time.perf_counter() - t0
    im4 = lowbit_integer(model, "w4a4", calib)
    aoq = torch_ao(model, calib)
    folder = Path(tempfile.mkdtemp(prefix="lowbit_bench_"))
    files = ort_models(model, im8, calib, folder)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {k: ort.InferenceSession(str(v), opts, providers=["CPUExecutionProvider"])
                for k, v in files.items()}

    schemes = scheme_disagreements(im8, torch.randn(8, 3, 32, 32, generator=g))
    for k, v in schemes.items():
        print(f"  {k:24s} {v['differ']:8d} of {v['cases']} differ from the exact result")
    results = []
    auto_paths: dict[int, dict[str, dict[str, str]]] = {}
    for bs in args.batches:
        x = torch.randn(bs, 3, 32, 32, generator=g)
        xn = x.numpy()
        q8 = im8.quantize_input(x)
        q4 = im4.quantize_input(x)
        # correctness first: the integer-operator ONNX graph is lowbit's model, bit for bit
        ref = im8(x).numpy()
        got = sessions["ORT lowbit integer"].run(None, {"input": xn})[0]
        assert np.array_equal(ref, got), "ORT lowbit integer differs from lowbit"
        agree = float((sessions["ORT lowbit qoperator"].run(None, {"input": xn})[0].argmax(1)
                       == ref.argmax(1)).mean())
        with torch.no_grad():
            fns = {
                "fp32 eager": lambda x=x: model(x),
                "lowbit int8": lambda q=q8: im8.run_integer(q),
                "lowbit int8 (AMX)": lambda q=q8: im8.run_integer(q, backend="amx"),
                "lowbit int8 (VNNI)": lambda q=q8: im8.run_integer(q, backend="vnni"),
                "lowbit int8 (oneDNN)": lambda q=q8: im8.run_integer(q, backend="onednn"),
                "lowbit int8 (_int_mm)": lambda q=q8: im8.run_integer(q, backend="compiled"),
                "lowbit int8 (torch kernels)": lambda q=q8: im8.run_integer(q, backend="torch"),
                "lowbit 4-bit": lambda q=q4: im4.run_integer(q),
                "torch.ao x86": lambda x=x: aoq(x),
            }
            if not vnni_available():
                del fns["lowbit int8 (VNNI)"], fns["lowbit int8 (AMX)"]
            elif not amx_available():
                del fns["lowbit int8 (AMX)"]
            for k, s in sessions.items():
                fns[k] = lambda s=s, xn=xn: s.run(None, {"input": xn})
            inner = 5 if bs == 1 else 1
            for f in fns.values():  # warm up (kernel builds, allocator, ORT arenas)
                f()
                f()
            auto_paths[bs] = {"int8": chosen_paths(im8, bs), "4-bit": chosen_paths(im4, bs)}
            print(f"  auto paths (batch {bs}): {auto_paths[bs]['int8']}")
            load_before = os.getloadavg()
            times: dict[str, list[float]] = {k: [] for k in fns}
            cpu: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(rounds):
                for k, f in fns.items():
                    w, c = timed(f, inner)
                    times[k].append(w)
                    cpu[k].append(c)
            load_after = os.getloadavg()
        base = statistics.median(times["fp32 eager"])
        ao = statistics.median(times["torch.ao x86"])
        ao_cpu = statistics.median(cpu["torch.ao x86"])
        for k, ts in times.items():
            med = statistics.median(ts)
            paired = [t / a for t, a in zip(ts, times["torch.ao x86"])]
            results.append({
                "batch": bs, "model": k, "median_ms": med,
                "p25_ms": float(np.percentile(ts, 25)), "p75_ms": float(np.percentile(ts, 75)),
                "cpu_median_ms": statistics.median(cpu[k]),
                "speedup_vs_fp32_eager": base / med, "time_vs_torch_ao": med / ao,
                "paired_vs_torch_ao": statistics.median(paired),
                "paired_vs_torch_ao_p25": float(np.percentile(paired, 25)),
                "paired_vs_torch_ao_p75": float(np.percentile(paired, 75)),
                "cpu_vs_torch_ao": statistics.median(cpu[k]) / ao_cpu,
                "load_before": load_before, "load_after": load_after,
                "issue_ms": ISSUE_MS.get(k) if bs == 128 else None,
            })
        results.append({"batch": bs, "model": "_check", "ort_integer_bit_exact": True,
                        "ort_qoperator_prediction_agreement": agree})
        print(f"batch {bs}: load {load_before} -> {load_after}")
        for r in results:
            if r["batch"] == bs and r["model"] != "_check":
                print(f"  {r['model']:32s} {r['median_ms']:9.2f} ms (cpu {r['cpu_median_ms']:8.2f})"
                      f"  x{r['speedup_vs_fp32_eager']:.2f} vs fp32, paired "
                      f"{r['paired_vs_torch_ao']:.2f} of torch.ao (cpu {r['cpu_vs_torch_ao']:.2f})")
    meta = {
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "python": platform.python_version()},
        "rounds": rounds, "to_integer_seconds_w8a8": convert_s,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "integer_nodes": len(im8.nodes),
        "onednn_convolutions_int8": onednn_convolutions(im8),
        "onednn_convolutions_4bit": onednn_convolutions(im4),
        "cpu_flags_avx512_vnni": "avx512_vnni" in Path("/proc/cpuinfo").read_text()
        if Path("/proc/cpuinfo").exists() else None,
        "scheme_disagreements": schemes,
        "auto_paths": auto_paths,
        "bit_accounting": im8.summary(),
        "note": "medians of interleaved rounds; the machine is shared: see the load averages",
    }
    out_dir = Path(tempfile.mkdtemp()) if args.quick else ROOT / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "integer_model.json").write_text(json.dumps({"meta": meta, "results": results},
                                                           indent=2))
    (out_dir / "integer_model.md").write_text(markdown(meta, results))
    print(f"wrote {out_dir / 'integer_model.md'}")


def markdown(meta: dict, results: list[dict]) -> str:
    m = meta["machine"]
    lines = [
        "# Integer-only ResNet-20: lowbit against its peers",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads for every runtime; "
        f"torch {m['torch']}, onnxruntime {m['onnxruntime']}; threads wait passively "
        f"(OMP_WAIT_POLICY={meta['omp_wait_policy']}, ORT allow_spinning=0). Generated by "
        "`python benchmarks/bench_integer_model.py`. ResNet-20 at 3x32x32 (random weights, "
        "randomized BatchNorm), medians of "
        f"{meta['rounds']} interleaved rounds. Ratios are to FP32 eager and to torch.ao x86 "
        "measured in the same rounds: `paired / torch.ao` is the median over rounds of (this "
        "model's time / torch.ao's time in the same round), with its quartiles; `cpu ms` is "
        "CPU time (all threads) per call, less sensitive than wall time to the other "
        "processes on this shared machine. to_integer took "
        f"{meta['to_integer_seconds_w8a8']:.1f} s for the W8A8 model.",
        "",
    ]
    if "onednn_convolutions_int8" in meta:
        u8, t8 = meta["onednn_convolutions_int8"]
        u4, t4 = meta["onednn_convolutions_4bit"]
        lines += [f"Convolutions in oneDNN (exact int8 sums, certified below 2^24): {u8} of "
                  f"{t8} (int8 model), {u4} of {t4} (4-bit model); CPU reports avx512_vnni: "
                  f"{meta['cpu_flags_avx512_vnni']}.", ""]
    elif "vnni_convolutions_int8" in meta:  # results written before the oneDNN path
        u8, t8 = meta["vnni_convolutions_int8"]
        u4, t4 = meta["vnni_convolutions_4bit"]
        lines += [f"Convolutions in the AVX-512 VNNI kernel: {u8} of {t8} (int8 model), {u4} of "
                  f"{t4} (4-bit model); CPU reports avx512_vnni: "
                  f"{meta['cpu_flags_avx512_vnni']}.", ""]
    if meta.get("auto_paths"):
        lines += ["`lowbit int8` (`backend=\"auto\"`) chose, per layer: "
                  + "; ".join(f"batch {bs}: " + ", ".join(
                      f"{p} {sum(v == p for v in d['int8'].values())}"
                      for p in ("vnni", "onednn", "int_mm")
                      if any(v == p for v in d["int8"].values()))
                      for bs, d in meta["auto_paths"].items())
                  + f" (of {len(next(iter(meta['auto_paths'].values()))['int8'])} fused "
                  "layers).", ""]
    for bs in sorted({r["batch"] for r in results}):
        rows = [r for r in results if r["batch"] == bs and r["model"] != "_check"]
        chk = next(r for r in results if r["batch"] == bs and r["model"] == "_check")
        lb, la = rows[0]["load_before"], rows[0]["load_after"]
        lines += [f"## Batch {bs}", "",
                  f"Load average (1/5/15 min) {lb[0]:.1f}/{lb[1]:.1f}/{lb[2]:.1f} before, "
                  f"{la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} after, on {m['cores']} CPUs.", "",
                  "| model | median ms | p25..p75 ms | cpu ms | speedup vs FP32 eager | "
                  "paired / torch.ao (p25..p75) | cpu / torch.ao |"
                  + (" issue (ms) |" if bs == 128 else ""),
                  "|---|---|---|---|---|---|---|" + ("---|" if bs == 128 else "")]
        for r in rows:
            issue = ""
            if bs == 128:
                issue = f" {r['issue_ms']} |" if r["issue_ms"] is not None else " - |"
            if "paired_vs_torch_ao" in r:
                ratio = (f"{r['paired_vs_torch_ao']:.2f} ({r['paired_vs_torch_ao_p25']:.2f}.."
                         f"{r['paired_vs_torch_ao_p75']:.2f}) | {r['cpu_vs_torch_ao']:.2f}")
                cpu_ms = f"{r['cpu_median_ms']:.2f}"
            else:  # results written before these columns existed
                ratio, cpu_ms = f"{r['time_vs_torch_ao']:.2f} | -", "-"
            lines.append(f"| {r['model']} | {r['median_ms']:.2f} | {r['p25_ms']:.2f}.."
                         f"{r['p75_ms']:.2f} | {cpu_ms} | {r['speedup_vs_fp32_eager']:.2f} | "
                         f"{ratio} |{issue}")
        lines += ["", f"ORT lowbit integer == lowbit, bit for bit: "
                      f"{chk['ort_integer_bit_exact']}; ORT lowbit qoperator predictions equal "
                      f"to lowbit's on {100 * chk['ort_qoperator_prediction_agreement']:.1f}% "
                      "of the batch.", ""]
    lines += ["The issue's figures (batch 128, measured on its own quiet machine) are listed "
              "for reference only; they are not comparable with times taken under a different "
              "load.", ""]
    sd = meta["scheme_disagreements"]
    lines += ["## Requantization schemes on the model's accumulators", "",
              "Every certified requantization of the W8A8 integer model (convolution "
              "accumulators with BatchNorm folded onto the next layer's grid, shortcuts into "
              "accumulator units, residual sums, the pooled sum), every channel, on 8 random "
              "images: outputs that differ from the exactly rounded value (round half to "
              "even). Schemes: `lowbit.integer.requant`; `certified` is lowbit's rule.", "",
              "| scheme | differing | cases | rate |", "|---|---|---|---|"]
    for k, v in sd.items():
        lines.append(f"| {k} | {v['differ']} | {v['cases']} | "
                     f"{v['differ'] / max(v['cases'], 1):.2e} |")
    lines += ["", "## Bit accounting of the W8A8 integer model", "",
              "| layer | op | ch | k min..max | M bits | C bits | worst abs(M·x+C) bits | "
              "tie windows | certified |", "|---|---|---|---|---|---|---|---|---|"]
    for r in meta["bit_accounting"]:
        lines.append(f"| {r['layer']} | {r['op']} | {r['channels']} | {r['shift_min']}.."
                     f"{r['shift_max']} | {r['M_bits']} | {r['C_bits']} | {r['acc_bits']} | "
                     f"{r['tie_windows']} | {'yes' if r['certified'] else 'exact'} |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
