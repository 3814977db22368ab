"""The ``lowbit`` command.

::

    lowbit train [RECIPE] [key=value ...] [--resume [PATH]] [--out DIR]
    lowbit eval CHECKPOINT [key=value ...]
    lowbit recipes
    lowbit summary RECIPE [key=value ...]
    lowbit export CHECKPOINT [--out PATH] [--onnx PATH] [--style integer|qoperator] [key=value]
    lowbit ptq CHECKPOINT [w_bits=4 a_bits=4 clip=aciq ... | precisions=w8a8,w4a4] [key=value]

``lowbit train`` with no recipe runs the default: a small CNN on scikit-learn's digits, trained
in FP32 and as W8A8 QAT, and prints both accuracies side by side. A user error (unknown recipe or
key, unreadable or mismatched checkpoint, missing data) prints one line and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1


class UsageError(ValueError):
    """A command-line mistake."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lowbit",
        description="Train and evaluate neural networks at low numerical precision.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    t = sub.add_parser(
        "train", help="train a recipe (default: digits, FP32 vs W8A8)",
        description="Train RECIPE (default: digits) with key=value overrides, e.g. "
                    "`lowbit train mnist_mlp_w8a8 epochs=3 optim.lr=0.05`.",
    )
    t.add_argument("items", nargs="*", metavar="[RECIPE] [key=value]",
                   help="recipe name or .toml path, then overrides")
    t.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue a run: a checkpoint, a run folder, or (no PATH) the newest run "
                        "of RECIPE under runs/ (or --out)")
    t.add_argument("--out", default=None, metavar="DIR", help="output folder")
    e = sub.add_parser("eval", help="evaluate a checkpoint",
                       description="Rebuild the model in CHECKPOINT and evaluate it.")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file or a run folder")
    e.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data.root=/data data.eval_split=test")
    sub.add_parser("recipes", help="list the recipes, one line each")
    s = sub.add_parser("summary", help="per-layer formats and memory of a recipe's model")
    s.add_argument("items", nargs="+", metavar="RECIPE [key=value]")
    x = sub.add_parser("export", help="write a checkpoint's integer-only model (.npz, ONNX)",
                       description="Convert the quantized model in CHECKPOINT to an integer-only "
                                   "model; write it for the NumPy runner and optionally ONNX.")
    x.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file or a run folder")
    x.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/data")
    x.add_argument("--out", default=None, metavar="PATH",
                   help="the .npz file (default: <checkpoint>.integer.npz)")
    x.add_argument("--onnx", default=None, metavar="PATH", help="also write an ONNX file")
    x.add_argument("--style", default="integer", choices=["integer", "qoperator"],
                   help="ONNX operators: integer (bit-exact) or qoperator (QLinearConv)")
    c = sub.add_parser("compare", help="runs side by side: a table and overlaid curves",
                       description="Compare finished (or running) runs: final and best "
                                   "accuracy or perplexity, the difference to the first run, "
                                   "and one PNG of their curves.")
    c.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders (a folder of variant runs stands for all of them)")
    c.add_argument("--labels", default=None, help="comma-separated names for the runs")
    c.add_argument("--out", default=None, metavar="PREFIX",
                   help="also write PREFIX.md (the table) and PREFIX.png (the curves)")
    c.add_argument("--title", default="", help="title of the plot")
    q = sub.add_parser(
        "ptq", help="post-training quantization of a float checkpoint (ACIQ, bit allocation, "
                    "bias correction)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize the float model in CHECKPOINT without retraining; write a\n"
                    "quantized checkpoint (run it with `lowbit eval`) and a report.\n\noptions "
                    "(key=value):\n"
                    + "\n".join(f"  {k:<17} {v}" for k, v in _ptq_option_docs().items())
                    + "\n\nOther key=value items are config overrides (data.root=...).",
    )
    q.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a float .pt file or a run folder, or a recipe name with "
                        "model.init=WEIGHTS (e.g. torchvision ResNet weights)")
    q.add_argument("items", nargs="*", metavar="key=value",
                   help="e.g. w_bits=4 a_bits=4 clip=aciq variants=true data.root=/data")
    return p


def _ptq_option_docs() -> dict[str, str]:
    from .ptq.run import OPTIONS

    return OPTIONS


def _split_items(items: Sequence[str]) -> tuple[str | None, list[str]]:
    recipe = None
    rest = list(items)
    if rest and "=" not in rest[0]:
        recipe = rest.pop(0)
    bad = [x for x in rest if "=" not in x]
    if bad:
        raise UsageError(f"expected key=value overrides after the recipe, got {bad[0]!r}")
    return recipe, rest


# ------------------------------------------------------------------------------ tables
def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join([line, sep, *body])


def _fmt(v: Any, pct: bool = False) -> str:
    if isinstance(v, float):
        return f"{v:.2f}%" if pct else f"{v:.4f}"
    return "-" if v is None else str(v)


def results_table(results: Sequence[tuple[str, Any]]) -> str:
    """A side-by-side table of finished runs (one row per variant)."""
    rows = []
    lm = any("val_ppl" in r.final for _, r in results)
    for label, r in results:
        f = r.final
        total = sum(row.get("time_s", 0.0) for row in r.metrics)
        row = [label or r.config.get("recipe", ""), r.config["quant"]["scheme"],
               str(f.get("epoch", 0))]
        if lm:
            row += [_fmt(f.get("val_ppl")), _fmt(r.best_metric)]
        else:
            row += [_fmt(f.get("val_top1"), True), _fmt(f.get("val_top5"), True),
                    _fmt(r.best_metric, True)]
        row += [_fmt(f.get("val_loss")), f"{total:.1f}s", str(r.out_dir)]
        rows.append(row)
    head = ["run", "scheme", "epochs"]
    head += ["val ppl", "best ppl"] if lm else ["top-1", "top-5", "best top-1"]
    head += ["val loss", "time", "folder"]
    return _table(head, rows)


# ---------------------------------------------------------------------------- commands
def _find_resume(recipe: str | None, out: str | None) -> Path:
    from .config import DEFAULT_RECIPE
    from .train.checkpoint import CheckpointError

    if out is not None:
        return Path(out)
    name = Path(recipe).stem if recipe else DEFAULT_RECIPE
    candidates = [
        d for d in Path("runs").glob(f"{name}-*")
        if d.is_dir() and ((d / "last.pt").is_file() or any(d.glob("*/last.pt")))
    ]
    if not candidates:
        raise CheckpointError(
            f"no checkpoint to resume: no runs/{name}-*/ folder holds a last.pt; give the path "
            f"(--resume PATH) or start a run with `lowbit train {name}`"
        )
    return max(candidates, key=lambda d: d.stat().st_mtime)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import engine

    recipe, overrides = _split_items(args.items)
    resume = None
    if args.resume is not None:
        resume = Path(args.resume) if args.resume else _find_resume(recipe, args.out)
        if not resume.exists():
            from .train.checkpoint import CheckpointError

            raise CheckpointError(f"no checkpoint to resume: {str(resume)!r} does not exist")
    results = engine.train_variants(recipe, overrides, out_dir=args.out, resume=resume)
    print()
    print(results_table(results))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .train import engine

    _, overrides = _split_items(["-", *args.overrides])
    integer = [o for o in overrides if o.split("=", 1)[0] == "integer"]
    overrides = [o for o in overrides if o not in integer]
    if integer and integer[-1].split("=", 1)[1].strip().lower() in ("true", "1", "yes"):
        from .integer import evaluate_checkpoint

        m = evaluate_checkpoint(args.checkpoint, overrides)  # the integer-only model
    else:
        m = engine.evaluate(args.checkpoint, overrides)
    rows = [[k, _fmt(v, pct=k in ("val_top1", "val_top5"))] for k, v in m.items()]
    print(_table(["metric", "value"], rows))
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import DEFAULT_RECIPE, list_recipes

    items = list_recipes()
    width = max((len(n) for n, _ in items), default=0)
    for name, desc in items:
        mark = " (default)" if name == DEFAULT_RECIPE else ""
        print(f"{name.ljust(width)}  {desc}{mark}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .train import engine

    recipe, overrides = _split_items(args.items)
    cfg = config_mod.resolve(recipe, overrides)
    runs = config_mod.split_variants(cfg)
    for _, sub in runs:
        config_mod.check_names(sub)
    for label, sub in runs:
        if label:
            print(f"== variant {label} ({sub['quant']['scheme']}) ==")
        task = engine.build_task(sub)
        model = engine.build_model(sub, task)
        from . import nn as lnn

        lnn.summary(model)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .integer import export_checkpoint

    _, overrides = _split_items(["-", *args.overrides])
    r = export_checkpoint(args.checkpoint, out=args.out, onnx=args.onnx, style=args.style,
                          overrides=overrides)
    print(r["summary_markdown"])
    print("\n".join(f"wrote {r[k]}" for k in ("npz", "onnx") if k in r))
    return 0


def cmd_ptq(args: argparse.Namespace) -> int:
    from .ptq import ptq_options, run_ptq, run_ptq_table

    _, items = _split_items(["-", *args.items])
    options, overrides = ptq_options(items)
    if "precisions" in options:
        r = run_ptq_table(args.checkpoint, overrides=overrides, **options)
        print(Path(r["table_md"]).read_text())
        print(f"wrote {r['table_md']}, {r['table_json']} and "
              f"{len(r['rows'])} quantized checkpoints beside them")
        return 0
    r = run_ptq(args.checkpoint, overrides=overrides, **options)
    rows = [[k, _fmt(r[k], pct=k in ("fp32_top1", "top1", "top1_drop"))]
            for k in ("fp32_top1", "top1", "top1_drop", "output_sqnr_db", "quantize_seconds")]
    for name, v in r.get("variants", {}).items():
        rows.append([f"{name} top1", _fmt(v["top1"], pct=True)])
    print(_table(["metric", "value"], rows))
    print("\n".join(f"wrote {r[k]}" for k in ("checkpoint", "report_md", "report_json")))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .train.metrics import compare_table, find_runs, plot_comparison

    runs = find_runs(args.runs)
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",")]
        if len(labels) != len(runs):
            raise ValueError(f"--labels names {len(labels)} runs but {len(runs)} were found: "
                             + ", ".join(str(r.folder) for r in runs))
        for r, label in zip(runs, labels):
            r.label = label
    if len({r.is_lm for r in runs}) > 1:
        raise ValueError("cannot compare language-model runs (perplexity) with classifiers "
                         "(top-1) in one table")
    table = compare_table(runs)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(table, encoding="utf-8")
        plot_comparison(runs, out.with_suffix(".png"), title=args.title)
        print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


_COMMANDS = {"train": cmd_train, "compare": cmd_compare, "eval": cmd_eval, "recipes": cmd_recipes,
             "summary": cmd_summary, "export": cmd_export, "ptq": cmd_ptq}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowbit`` command; returns the exit code (0 ok, 1 diverged, 2 user error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    from .train.engine import TrainingDivergedError

    try:
        return _COMMANDS[args.command](args)
    except TrainingDivergedError as exc:
        print(f"lowbit: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as exc:
        # configuration, checkpoint and data errors carry a complete message; no traceback
        # (set LOWBIT_DEBUG=1 to see one)
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        print(f"lowbit: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lowbit: interrupted; continue with `lowbit train --resume`", file=sys.stderr)
        return 130
