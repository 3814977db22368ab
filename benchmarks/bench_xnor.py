"""XNOR-popcount GEMM and packed binary MLP inference against float32 and int8 baselines.

Everything is timed in the same process on the same thread count (default 2):

1. ``M = N = K = --size`` products of ±1 matrices: float32 ``torch.mm``, ``torch._int_mm`` on
   int8, and ``lowbit.kernels.xnor_matmul`` on pre-packed operands for every compiled ISA path
   (plus the time with the left operand packed inside the timing, as a layer would). The
   pure-torch fallback is timed at ``--torch-size`` (it is a reference, not a fast path).
   All results are checked to be equal.
2. The binary MNIST MLP (784 -> 3 x ``--hidden`` -> 10, BatchNorm after each layer, sign
   activations) on real MNIST test images: float32 eager (±1 weights stored as float32) vs
   packed (first layer by bit planes on the uint8 pixels, the others XNOR-popcount), batch 1
   and 256. Weights are random (speed does not depend on them); the logits of both are checked
   to be identical.

Usage: ``python benchmarks/bench_xnor.py [--size 4096] [--threads 2] [--quick]``; writes
``benchmarks/results/xnor.json`` and ``xnor.md`` (``--quick`` writes to a temporary folder).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lowbit.kernels.pack import available_backends, pack_signs
from lowbit.kernels.xnor import xnor_matmul
from lowbit.nn.binary import PackedBinaryLinear, binary_sign

ROOT = Path(__file__).resolve().parent
PAPER_MNIST_SPEEDUP = 7.0  # QNN paper: MNIST MLP with the XNOR GPU kernel vs its unoptimised one


def timeit(fns: dict[str, Callable[[], object]], repeats: int,
           min_time: float = 0.0) -> dict[str, dict[str, float]]:
    """Best and median wall time of each function over ``repeats`` rounds, after one warm-up
    call each. The functions take turns within every round, so a change in machine load hits
    them alike. A function faster than ``min_time`` is looped and averaged within its turn."""
    inner = {}
    for name, fn in fns.items():
        fn()
        t = time.perf_counter()
        fn()
        once = max(time.perf_counter() - t, 1e-9)
        inner[name] = max(1, int(min_time / once)) if min_time > 0 else 1
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            times[name].append((time.perf_counter() - t) / inner[name])
    return {name: {"best_s": min(ts), "median_s": statistics.median(ts), "runs": repeats,
                   "calls_per_run": inner[name]} for name, ts in times.items()}


def machine_info(threads: int) -> dict[str, object]:
    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "avx512_vpopcntdq": "avx512_vpopcntdq" in flags,
        "avx2": "avx2" in flags,
        "torch": torch.__version__,
        "xnor_backends": available_backends(),
        "load_average_start": os.getloadavg(),
    }


# ------------------------------------------------------------------------------- GEMM


def bench_gemm(size: int, repeats: int, torch_size: int) -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    m = n = k = size
    a = torch.randint(0, 2, (m, k), generator=gen).float() * 2 - 1
    b = torch.randint(0, 2, (k, n), generator=gen).float() * 2 - 1
    a8, b8 = a.to(torch.int8), b.to(torch.int8)
    pa, pb = pack_signs(a), pack_signs(b.t())

    ref = torch._int_mm(a8, b8)
    best = available_backends()[0]
    fns: dict[str, Callable[[], object]] = {
        "float32 torch.mm": lambda: torch.mm(a, b),
        "int8 torch._int_mm": lambda: torch._int_mm(a8, b8),
    }
    for backend in available_backends():
        if backend != "torch":
            fns[f"xnor_matmul {backend} (packed)"] = (
                lambda be=backend: xnor_matmul(pa, pb, backend=be))
    fns[f"xnor_matmul {best} (+ packing A)"] = lambda: xnor_matmul(pack_signs(a), pb,
                                                                   backend=best)
    exact = {name: bool(torch.equal(fn().to(torch.int32), ref))
             for name, fn in fns.items() if name != "int8 torch._int_mm"}
    rows = timeit(fns, repeats)

    base = rows["float32 torch.mm"]["best_s"]
    int8 = rows["int8 torch._int_mm"]["best_s"]
    for r in rows.values():
        r["speedup_vs_float32"] = base / r["best_s"]
        r["speedup_vs_int8"] = int8 / r["best_s"]
        r["binary_gops"] = 2.0 * m * n * k / r["best_s"] / 1e9

    # pure-torch fallback, at a smaller size, against float32 mm at that size
    ts = min(torch_size, size)
    at, bt = a[:ts, :ts].contiguous(), b[:ts, :ts].contiguous()
    pat, pbt = pack_signs(at), pack_signs(bt.t())
    small: dict[str, object] = {"size": ts}
    small.update(timeit({
        "float32 torch.mm": lambda: torch.mm(at, bt),
        "xnor_matmul torch fallback": lambda: xnor_matmul(pat, pbt, backend="torch"),
    }, max(1, repeats // 2)))
    small["xnor_matmul torch fallback"]["speedup_vs_float32"] = (
        small["float32 torch.mm"]["best_s"] / small["xnor_matmul torch fallback"]["best_s"])
    exact["xnor_matmul torch fallback"] = bool(torch.equal(
        xnor_matmul(pat, pbt, backend="torch"), torch.mm(at, bt).to(torch.int32)))

    memory = {
        "float32_bytes": k * n * 4,
        "int8_bytes": k * n,
        "packed_bytes": pb.nbytes(),
    }
    memory["ratio_vs_float32"] = memory["float32_bytes"] / memory["packed_bytes"]
    memory["ratio_vs_int8"] = memory["int8_bytes"] / memory["packed_bytes"]
    return {"size": size, "timings": rows, "torch_fallback": small, "exact": exact,
            "weight_memory": memory}


# ------------------------------------------------------------------------ MNIST MLP


def load_mnist_test(n: int) -> tuple[torch.Tensor, str]:
    """First ``n`` MNIST test images as uint8 [n, 784] (random pixels if the files are absent)."""
    roots = [os.environ.get("LOWBIT_DATA", ""), str(ROOT.parents[1] / "shared" / "datasets")]
    for root in roots:
        path = Path(root) / "mnist" / "t10k-images-idx3-ubyte.gz" if root else None
        if path is not None and path.is_file():
            data = gzip.decompress(path.read_bytes())
            images = torch.frombuffer(bytearray(data[16:]), dtype=torch.uint8).view(-1, 784)
            return images[:n].clone(), f"MNIST test images ({path})"
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 784), generator=gen, dtype=torch.uint8), "random pixels"


class SignAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return binary_sign(x)


def build_float_mlp(hidden: int, depth: int = 3) -> nn.Sequential:
    """Binary MLP as deployed in float32: ±1 weights stored as float, BN, sign activations.

    It takes the raw pixel values (0..255 as float); the input normalisation is folded into the
    first BatchNorm, so every matrix product is an exact integer sum in both models."""
    torch.manual_seed(0)
    widths = [784] + [hidden] * depth + [10]
    layers: list[nn.Module] = []
    for i, (fin, fout) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(fin, fout, bias=False)
        lin.weight.data = binary_sign(lin.weight.data)
        bn = nn.BatchNorm1d(fout)
        spread = 255.0 * 20 if i == 0 else float(fin) ** 0.5
        bn.running_mean.normal_(0, spread * 0.1)
        bn.running_var.fill_(spread**2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.1)
        layers += [lin, bn]
        if i < depth:
            layers.append(SignAct())
    return nn.Sequential(*layers).eval()


def build_packed_mlp(float_mlp: nn.Sequential) -> nn.Sequential:
    """The same network on packed weights: bit planes for the uint8 input, XNOR after."""
    layers: list[nn.Module] = []
    first = True
    for mod in float_mlp:
        if isinstance(mod, nn.Linear):
            layers.append(PackedBinaryLinear.from_linear(mod, input_bits=8 if first else None))
            first = False
        elif isinstance(mod, nn.BatchNorm1d):
            layers.append(mod)
        # SignAct is dropped: each packed layer binarizes its own input while packing it
    return nn.Sequential(*layers).eval()


def bench_mlp(hidden: int, repeats: int) -> dict[str, object]:
    images, source = load_mnist_test(256)
    float_mlp = build_float_mlp(hidden)
    packed_mlp = build_packed_mlp(float_mlp)
    out: dict[str, object] = {"hidden": hidden, "depth": 3, "input": source,
                              "weights": "random ±1 (timing does not depend on values)"}
    with torch.inference_mode():
        same = torch.equal(float_mlp(images.float()), packed_mlp(images))
        out["logits_identical_batch256"] = bool(same)
        for batch in (1, 256):
            x8 = images[:batch].contiguous()
            xf = x8.float()
            t = timeit({"float": lambda xf=xf: float_mlp(xf),
                        "packed": lambda x8=x8: packed_mlp(x8)}, repeats, min_time=0.05)
            tf, tp = t["float"], t["packed"]
            out[f"batch{batch}"] = {
                "float32_eager": tf,
                "packed": tp,
                "speedup": tf["best_s"] / tp["best_s"],
                "float32_images_per_s": batch / tf["best_s"],
                "packed_images_per_s": batch / tp["best_s"],
            }
    fbytes = sum(m.weight.numel() * 4 for m in float_mlp if isinstance(m, nn.Linear))
    pbytes = sum(m.packed_weight.nbytes() for m in packed_mlp
                 if isinstance(m, PackedBinaryLinear))
    out["weight_bytes"] = {"float32": fbytes, "packed": pbytes, "ratio": fbytes / pbytes}
    return out


# ------------------------------------------------------------------------------ report


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.3f} s"


def write_markdown(res: dict, path: Path) -> None:
    g, mlp, mach = res["gemm"], res["mlp"], res["machine"]
    lines = [
        "# XNOR-popcount GEMM and packed binary MLP (CPU)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {mach['cpu']}, {mach['logical_cpus']} logical CPUs, {mach['threads']} "
        f"threads, torch {mach['torch']}, AVX-512 VPOPCNTDQ: {mach['avx512_vpopcntdq']}; "
        f"load average at start {tuple(round(v, 2) for v in mach['load_average_start'])}, "
        f"at end {tuple(round(v, 2) for v in res['load_average_end'])} (other jobs share the "
        "CPUs: times are the best of the runs).",
        "",
        f"## {g['size']}x{g['size']}x{g['size']} product of ±1 matrices",
        "",
        "| method | best | median | vs float32 mm | vs int8 _int_mm | binary GOP/s | exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in g["timings"].items():
        lines.append(
            f"| {name} | {fmt_s(r['best_s'])} | {fmt_s(r['median_s'])} | "
            f"{r['speedup_vs_float32']:.2f}x | {r['speedup_vs_int8']:.2f}x | "
            f"{r['binary_gops']:.0f} | {g['exact'].get(name, '-')} |")
    tf = g["torch_fallback"]
    lines += [
        "",
        f"Pure-torch fallback at {tf['size']}^3: "
        f"{fmt_s(tf['xnor_matmul torch fallback']['best_s'])} vs float32 mm "
        f"{fmt_s(tf['float32 torch.mm']['best_s'])} "
        f"({tf['xnor_matmul torch fallback']['speedup_vs_float32']:.2f}x), exact: "
        f"{g['exact']['xnor_matmul torch fallback']}.",
        "",
        f"Weight memory ({g['size']}x{g['size']}): float32 {g['weight_memory']['float32_bytes']:,} B,"
        f" int8 {g['weight_memory']['int8_bytes']:,} B, packed "
        f"{g['weight_memory']['packed_bytes']:,} B: "
        f"{g['weight_memory']['ratio_vs_float32']:.0f}x less than float32, "
        f"{g['weight_memory']['ratio_vs_int8']:.0f}x less than int8.",
        "",
        f"## Binary MNIST MLP 784-{mlp['hidden']}-{mlp['hidden']}-{mlp['hidden']}-10 inference",
        "",
        f"Input: {mlp['input']}; weights: {mlp['weights']}. Logits of the packed model identical "
        f"to the float32 model: {mlp['logits_identical_batch256']}. Weight memory: float32 "
        f"{mlp['weight_bytes']['float32']:,} B, packed {mlp['weight_bytes']['packed']:,} B "
        f"({mlp['weight_bytes']['ratio']:.1f}x less).",
        "",
        "| batch | float32 eager | packed | speedup | float32 img/s | packed img/s |",
        "|---|---|---|---|---|---|",
    ]
    for batch in (1, 256):
        r = mlp[f"batch{batch}"]
        lines.append(
            f"| {batch} | {fmt_s(r['float32_eager']['best_s'])} | {fmt_s(r['packed']['best_s'])}"
            f" | {r['speedup']:.2f}x | {r['float32_images_per_s']:.0f} | "
            f"{r['packed_images_per_s']:.0f} |")
    lines += [
        "",
        f"For reference, the QNN paper reports its MNIST MLP {PAPER_MNIST_SPEEDUP:.0f}x faster "
        "with the XNOR GPU kernel than with its own unoptimised GPU kernel (not cuBLAS); the "
        "baselines here are PyTorch's optimised float32 (MKL) and int8 (oneDNN) CPU kernels.",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--torch-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default benchmarks/results; a temporary one with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.torch_size, args.hidden, args.repeats = 512, 256, 512, 2
    torch.set_num_threads(args.threads)
    res: dict[str, object] = {
        "command": "python benchmarks/bench_xnor.py" + (" --quick" if args.quick else "")
        + (f" --size {args.size}" if not args.quick and args.size != 4096 else "")
        + (f" --hidden {args.hidden}" if not args.quick and args.hidden != 4096 else "")
        + (f" --threads {args.threads}" if args.threads != 2 else ""),
        "machine": machine_info(args.threads),
    }
    res["gemm"] = bench_gemm(args.size, args.repeats, args.torch_size)
    res["mlp"] = bench_mlp(args.hidden, args.repeats)
    res["load_average_end"] = os.getloadavg()
    out_dir = args.out if args.out is not None else (None if args.quick else ROOT / "results")
    if out_dir is None:  # a quick smoke run does not overwrite the committed results
        out_dir = Path(tempfile.mkdtemp(prefix="bench_xnor_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "xnor.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(res, out_dir / "xnor.md")
    print((out_dir / "xnor.md").read_text())
    print(f"wrote {out_dir / 'xnor.json'} and {out_dir / 'xnor.md'}")
    return res


if __name__ == "__main__":
    main()
