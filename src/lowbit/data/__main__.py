"""``python -m lowbit.data download NAME [--root DIR] [--mirror URL]``: fetch a dataset
(with checksum verification) into the data folder; ``python -m lowbit.data list``."""

from __future__ import annotations

import argparse
import sys

from . import DATASETS, data_root, get_dataset

DOWNLOADABLE = ("mnist", "cifar10", "ptb")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lowbit.data")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download a dataset and verify its checksums")
    d.add_argument("name", choices=DOWNLOADABLE)
    d.add_argument("--root", default=None, help="data folder (default $LOWBIT_DATA or "
                   "~/.cache/lowbit)")
    d.add_argument("--mirror", default=None, help="base URL replacing the public one")
    sub.add_parser("list", help="list dataset names")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name, (splits, _) in DATASETS.items():
            print(f"{name:10s} splits: {', '.join(splits)}")
        return 0
    opts = {"mirror": args.mirror} if args.mirror else {}
    get_dataset(args.name, "train", root=args.root, download=True, **opts)
    if args.name != "ptb":
        get_dataset(args.name, "test", root=args.root, download=True, **opts)
    print(f"{args.name} ready in {data_root(args.root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
