"""Cost of the quantized backward GEMMs (lowbit.nn.qgemm) against the default gemm, on CPU.

Two parts, each timed in one process with the configurations interleaved round by round (so
background load spreads evenly); ratios are medians of per-round ratios to the baseline.
Both the wall-clock time and the thread's CPU time are recorded; with the default single
thread the CPU time is the whole computation and is not inflated by other processes, so its
ratios are the ones to read on a shared machine.

1. One layer, forward + backward, on inputs that are already quantized (so only the product
   and the backward rounding are timed): ResNet-20's three 3x3 convolution shapes at batch
   128 and a 512x512 linear layer. Baseline: the float op. Configurations: the default gemm
   with an int8 / e5m2 gradient quantizer on the output (one rounded error for both
   backward GEMMs), the ``qbackward``, ``bifurcated`` (int8 error below + int16 copy for dW),
   ``bifurcated-fp32`` and ``fp8`` (e5m2 error + e5m2 dW) gemms, and the two-convolution
   "biprecision" of the 8-bit training paper's code (a second forward convolution carries
   the FP32-error weight gradient), which the qgemm design avoids.
2. One training step of ResNet-20, batch 128 (zero_grad, forward, cross-entropy, backward,
   SGD): FP32 (and FP32 with Range BN) against w8a8 (no gradient rounding), w8a8g8 with the
   default gemm, with the bifurcated one and as the 8-bit recipe trains it (8-bit Range BN),
   fp8 with the default gemm, with the fp8 one and as the FP8 recipe trains it (fp16 master
   weights with stochastic rounding, enhanced loss scaling), and fp8-hybrid.

    python benchmarks/bench_qgemm.py                 # both parts, writes results/qgemm.{json,md}
    python benchmarks/bench_qgemm.py --part layer --repeats 30
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lowbit.nn import QuantizedBackward, convert, get_scheme, quantized_conv2d, quantized_linear
from lowbit.quant.functional import fake_quantize, quantize_grad
from lowbit.quant.spec import QuantSpec

RESULTS = Path(__file__).resolve().parent / "results"
INT8_SR = QuantSpec("int8", rounding="stochastic")
E5M2_SR = QuantSpec("e5m2", observer="none", rounding="stochastic")


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int, warmup: int,
                 baseline: str) -> list[dict]:
    for _ in range(warmup):
        for f in fns.values():
            f()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            f()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.thread_time() - c0)
    rows = []
    for k in fns:
        row = {"config": k}
        for clock, times in (("wall", wall), ("cpu", cpu)):
            ts, base = times[k], times[baseline]
            row[f"{clock}_median_ms"] = statistics.median(ts) * 1e3
            row[f"{clock}_min_ms"] = min(ts) * 1e3
            row[f"{clock}_ratio_paired"] = statistics.median(
                t / b for t, b in zip(ts, base, strict=True))
            row[f"{clock}_ratio_min"] = min(ts) / min(base)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- part 1: layer
def _layer_cases() -> list[tuple[str, tuple[int, ...], tuple[int, ...], dict]]:
    return [
        ("conv 16->16, 32x32", (128, 16, 32, 32), (16, 16, 3, 3), {"padding": 1}),
        ("conv 32->32, 16x16", (128, 32, 16, 16), (32, 32, 3, 3), {"padding": 1}),
        ("conv 64->64, 8x8", (128, 64, 8, 8), (64, 64, 3, 3), {"padding": 1}),
        ("linear 512->512", (128, 512), (512, 512), {}),
    ]


def _layer_fns(xshape, wshape, conv_kw, seed: int) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(seed)
    is_conv = len(wshape) == 4
    xq = fake_quantize(torch.randn(xshape, generator=g).relu(), "uint8")
    wq = fake_quantize(torch.randn(wshape, generator=g) * 0.1, "int8", axis=0)
    x = xq.clone().requires_grad_()
    w = wq.clone().requires_grad_()

    def op(a, b):
        return F.conv2d(a, b, None, **conv_kw) if is_conv else F.linear(a, b)

    def qop(error, backward):
        if is_conv:
            return quantized_conv2d(x, w, None, 1, conv_kw.get("padding", 0), error=error,
                                    backward=backward)
        return quantized_linear(x, w, error=error, backward=backward)

    gout = torch.randn(op(xq, wq).shape, generator=g)

    def run(make_out):
        def f():
            x.grad = w.grad = None
            make_out().backward(gout)
        return f

    def biprecision():  # quantized.pytorch's conv2d_biprec: two forward products
        out1 = op(x.detach(), w)
        out2 = quantize_grad(op(x, w.detach()), "int8", rounding="stochastic")
        return out1 + out2 - out1.detach()

    return {
        "float": run(lambda: op(x, w)),
        "default + int8 grad": run(lambda: quantize_grad(op(x, w), "int8")),
        "qbackward int8": run(lambda: qop(INT8_SR, QuantizedBackward())),
        "bifurcated (int8 + int16 copy)": run(lambda: qop(INT8_SR, QuantizedBackward("int16"))),
        "bifurcated-fp32": run(lambda: qop(INT8_SR, QuantizedBackward(None))),
        "two-conv biprecision (paper code)": run(biprecision),
        "default + e5m2 grad": run(lambda: quantize_grad(op(x, w), "e5m2")),
        "fp8 (e5m2 error + e5m2 dW)": run(lambda: qop(E5M2_SR,
                                                      QuantizedBackward(wgrad="e5m2"))),
    }


def part_layer(repeats: int, warmup: int, seed: int) -> list[dict]:
    out = []
    for name, xs, ws, kw in _layer_cases():
        rows = _interleaved(_layer_fns(xs, ws, kw, seed), repeats, warmup, "float")
        out.append({"case": name, "rows": rows})
    return out


# --------------------------------------------------------------------------- part 2: model
def part_model(batch: int, repeats: int, warmup: int, seed: int) -> list[dict]:
    from lowbit.models import create

    torch.manual_seed(seed)
    base = create("resnet20", num_classes=10)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    from lowbit.train.loss_scaler import EnhancedLossScaler
    from lowbit.train.master_weights import MasterWeights

    range8 = {"norm": "range", "norm_kwargs": {"act_format": "int8", "grad_format": "int8"}}
    # name: (scheme, convert kwargs, recipe extras: fp16 master weights + enhanced loss scaling)
    configs = {
        "fp32": (None, {}, False),
        "fp32, Range BN": (None, {"norm": "range"}, False),
        "w8a8 (no gradient rounding)": ("w8a8", {}, False),
        "w8a8g8, default gemm": (replace(get_scheme("w8a8g8"), gemm="default"), {}, False),
        "w8a8g8, bifurcated": ("w8a8g8", {}, False),
        "w8a8g8, bifurcated, 8-bit Range BN (recipe)": ("w8a8g8", range8, False),
        "fp8, default gemm": (replace(get_scheme("fp8"), gemm="default"), {}, False),
        "fp8, fp8 gemm": ("fp8", {}, False),
        "fp8 + fp16 master + loss scaling (recipe)": ("fp8", {}, True),
        "fp8-hybrid": ("fp8-hybrid", {}, False),
    }
    fns = {}
    for name, (scheme, kw, recipe) in configs.items():
        model = convert(base, scheme, **kw)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        if recipe:
            opt = MasterWeights(opt, "fp16", rounding="stochastic", seed=seed)
            scaler = EnhancedLossScaler()

            def step(model=model, opt=opt, scaler=scaler):
                opt.zero_grad(set_to_none=True)
                scaler.scale(F.cross_entropy(model(x), y)).backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        else:
            def step(model=model, opt=opt):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

        fns[name] = step
    return _interleaved(fns, repeats, warmup, "fp32")


# ------------------------------------------------------------------------------- output
def _table(rows: list[dict], base: str) -> list[str]:
    out = [f"| config | CPU ms (median) | x {base} (CPU, paired) | wall ms (median) "
           f"| x {base} (wall, paired) | x {base} (wall, min) |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['cpu_median_ms']:.1f} | {r['cpu_ratio_paired']:.2f} "
                   f"| {r['wall_median_ms']:.1f} | {r['wall_ratio_paired']:.2f} "
                   f"| {r['wall_ratio_min']:.2f} |")
    return out


def markdown(res: dict) -> str:
    head = (f"({res['date']}, {res['machine']['processor']}, {res['threads']} thread(s), "
            f"torch {res['machine']['torch']}, load average "
            f"{res['load_average_before'][0]:.1f} -> {res['load_average_after'][0]:.1f})")
    lines = [f"# Quantized backward GEMMs on CPU {head}", "",
             "Ratios are medians of per-round ratios to the baseline timed in the same round. "
             "CPU = the timing thread's CPU time (with one thread it is the whole computation "
             "and does not count time lost to other processes on a loaded machine); wall = "
             "elapsed time. On a shared machine, layer-level differences below about 15 % are "
             "noise (a rounded error does not make a convolution faster: ratios below 1 are "
             "such noise).", ""]
    if "layer" in res:
        when = f", measured {res['layer_date']}" if res.get("layer_date") else ""
        lines += [f"## One layer, forward + backward, pre-quantized inputs "
                  f"({res['layer_repeats']} interleaved rounds{when})", ""]
        for case in res["layer"]:
            lines += [f"### {case['case']}", "", *_table(case["rows"], "float"), ""]
    if "model" in res:
        when = f", measured {res['model_date']}" if res.get("model_date") else ""
        lines += [f"## ResNet-20 training step, batch {res['batch']} "
                  f"({res['model_repeats']} interleaved rounds{when})", "",
                  *_table(res["model"], "fp32"), "",
                  "Goal (issues 6 and 7): an 8-bit / simulated FP8 step at most 1.5x FP32."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["layer", "model", "both"], default="both")
    p.add_argument("--repeats", type=int, default=15, help="rounds per layer case")
    p.add_argument("--model-repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: CPU-time ratios are exact under load)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    res: dict = {
        "benchmark": "qgemm",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(),
                    "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "threads": a.threads, "batch": a.batch,
        "load_average_before": list(os.getloadavg()),
    }
    if a.part in ("layer", "both"):
        res["layer_repeats"] = a.repeats
        res["layer"] = part_layer(a.repeats, a.warmup, a.seed)
    if a.part in ("model", "both"):
        res["model_repeats"] = a.model_repeats
        res["model"] = part_model(a.batch, a.model_repeats, a.warmup, a.seed)
    res["load_average_after"] = list(os.getloadavg())
    a.out.mkdir(parents=True, exist_ok=True)
    previous = a.out / "qgemm.json"
    if a.part != "both" and previous.is_file():  # keep the part not re-measured, with its date
        old = json.loads(previous.read_text())
        other = "model" if a.part == "layer" else "layer"
        if other in old:
            res[other] = old[other]
            res[f"{other}_repeats"] = old.get(f"{other}_repeats")
            res[f"{other}_date"] = old.get(f"{other}_date", old.get("date"))
    (a.out / "qgemm.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (a.out / "qgemm.md").write_text(md)
    print(md)
    return res


if __name__ == "__main__":
    main()
