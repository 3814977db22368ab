"""One QAT training step of ResNet-20 (CIFAR shapes): FP32 against quantized schemes.

A step is ``zero_grad`` + forward + cross-entropy + backward + SGD(momentum) update, batch
128, on random CIFAR-shaped data. Every configuration is timed in the same process, the
configurations interleaved round by round so that load from other processes spreads evenly;
the table reports the median and the minimum step time and their ratios to FP32. By default
two setups run: 2 threads timed by the wall clock (the goal's setting) and 1 thread timed by
the process's CPU time (steady on a shared machine).

Goal (issue 3): W8A8 QAT step at most 1.15x the FP32 step.

    python benchmarks/bench_qat_step.py                       # fp32, w8a8 and its parts
    python benchmarks/bench_qat_step.py --schemes w8a8,w4a4,w1a1,fp8,fp8-hybrid,w8a8g8
    python benchmarks/bench_qat_step.py --setups 2:wall --repeats 30
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.nn import QuantScheme, convert, get_scheme

GOAL = 1.15
RESULTS = Path(__file__).resolve().parent / "results"


def _local_resnet20(num_classes: int = 10) -> nn.Module:  # pragma: no cover - fallback only
    """ResNet-20 (He et al. 2016, option A shortcuts), used if lowbit.models is absent."""

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad = cout - cin

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            short = x
            if self.pad:
                short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
            return F.relu(out + short)

    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                               nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def make_resnet20() -> tuple[nn.Module, str]:
    try:
        from lowbit.models import create
    except ImportError:  # pragma: no cover
        return _local_resnet20(), "local"
    return create("resnet20", num_classes=10), "lowbit.models.create('resnet20')"


def _configs(schemes: list[str], parts: bool) -> dict[str, str | QuantScheme]:
    cfg: dict[str, str | QuantScheme] = {}
    for s in schemes:
        cfg[s] = s
        if parts and s == "w8a8":
            w8 = get_scheme("w8a8")
            cfg["w8a8 (weights only)"] = QuantScheme(weight=w8.weight, first_last="same")
            cfg["w8a8 (activations only)"] = QuantScheme(act=w8.act, first_last="same")
    return cfg


def _kernel_status() -> str:
    try:
        from lowbit.kernels import fake_quant
    except ImportError:
        return "not present (pure-torch reference path)"
    try:
        return "fused C++ kernel" if fake_quant.available() else "unavailable (pure torch)"
    except Exception as err:  # noqa: BLE001 - report, do not fail the benchmark
        return f"error: {err}"


def run(batch: int, threads: int, repeats: int, warmup: int, schemes: list[str],
        parts: bool, seed: int, clock: str = "wall") -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    base, source = make_resnet20()
    configs = {"fp32": None, **_configs(schemes, parts)}
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)

    runs = {}
    for name, scheme in configs.items():
        model = copy.deepcopy(base) if scheme is None else convert(base, scheme)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runs[name] = (model, opt)

    timer = time.perf_counter if clock == "wall" else time.process_time

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
        t0 = timer()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return timer() - t0

    for _ in range(warmup):
        for model, opt in runs.values():
            step(model, opt)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, opt) in runs.items():
            times[name].append(step(model, opt))
    load_after = os.getloadavg()

    fp32_med = statistics.median(times["fp32"])
    fp32_min = min(times["fp32"])
    rows = []
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        rows.append({
            "config": name,
            "median_ms": statistics.median(ts) * 1e3,
            "min_ms": min(ts) * 1e3,
            "q1_ms": q[0] * 1e3,
            "q3_ms": q[2] * 1e3,
            "ratio_median": statistics.median(ts) / fp32_med,
            "ratio_min": min(ts) / fp32_min,
            # each round times every config back to back: the median of the per-round
            # ratios pairs measurements taken under the same background load
            "ratio_paired": statistics.median(t / f for t, f in zip(ts, times["fp32"])),
        })
    return {
        "benchmark": "qat_step",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "model": f"resnet20 ({source})",
        "batch": batch,
        "threads": threads,
        "clock": clock,
        "repeats": repeats,
        "warmup": warmup,
        "fake_quant_kernel": _kernel_status(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "goal": {"config": "w8a8", "max_ratio": GOAL},
        "results": rows,
        "raw_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
    }


def markdown_run(res: dict) -> str:
    lines = [
        f"### {res['threads']} thread(s), {res['clock']} clock",
        "",
        f"{res['repeats']} interleaved rounds; load average {res['load_average_before'][0]:.1f}"
        f" -> {res['load_average_after'][0]:.1f} on {res['machine']['cpu_count']} cores.",
        "",
        "| config | median ms | min ms | IQR ms | x FP32 (median) | x FP32 (min) "
        "| x FP32 (paired) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["results"]:
        lines.append(
            f"| {r['config']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | "
            f"{r['q1_ms']:.1f}-{r['q3_ms']:.1f} | {r['ratio_median']:.3f} | "
            f"{r['ratio_min']:.3f} | {r['ratio_paired']:.3f} |"
        )
    w8 = next((r for r in res["results"] if r["config"] == "w8a8"), None)
    if w8 is not None:
        verdict = "within" if w8["ratio_paired"] <= GOAL else "above"
        lines += ["", f"W8A8 / FP32 = {w8['ratio_paired']:.3f} (paired median), "
                      f"{w8['ratio_median']:.3f} (ratio of medians), {w8['ratio_min']:.3f} "
                      f"(ratio of minima): {verdict} the goal of at most {GOAL}x."]
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    first = report["runs"][0]
    head = [
        f"## QAT training step, ResNet-20, batch {first['batch']} "
        f"({first['date']}, {first['machine']['processor']}, {first['machine']['platform']}, "
        f"torch {first['machine']['torch']}; fake-quant: {first['fake_quant_kernel']})",
        "",
        "Paired = median over rounds of (config step / FP32 step in the same round). Wall "
        "clock is what the goal is about; on a shared, loaded machine it swings with the "
        "other processes, and the CPU time of a single-threaded run is the steadier measure "
        "of the extra work quantization adds.",
        "",
        "",
    ]
    return "\n".join(head) + "\n".join(markdown_run(r) for r in report["runs"])


def _setup(text: str) -> tuple[int, str]:
    threads, _, clock = text.partition(":")
    if clock not in ("wall", "cpu") or not threads.isdigit() or int(threads) < 1:
        raise argparse.ArgumentTypeError(
            f"setup {text!r}: expected THREADS:CLOCK with CLOCK 'wall' or 'cpu', e.g. 2:wall")
    return int(threads), clock


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--setups", default="2:wall,1:cpu",
                   help="comma-separated THREADS:CLOCK runs; clock 'wall' (perf_counter) or "
                        "'cpu' (process_time: this process's CPU time, steadier on a shared "
                        "machine, comparable to wall time with one thread)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--schemes", default="w8a8", help="comma-separated scheme names")
    p.add_argument("--no-parts", action="store_true",
                   help="skip the weights-only / activations-only breakdown of w8a8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default="qat_step", help="file stem of the JSON/markdown output")
    args = p.parse_args(argv)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    for s in schemes:
        get_scheme(s)  # fail early on a typo
    setups = [_setup(t.strip()) for t in args.setups.split(",") if t.strip()]
    report = {"benchmark": "qat_step", "goal": {"config": "w8a8", "max_ratio": GOAL},
              "runs": [run(args.batch, threads, args.repeats, args.warmup, schemes,
                           not args.no_parts, args.seed, clock) for threads, clock in setups]}
    md = markdown(report)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(md)
    return report


if __name__ == "__main__":
    main()
