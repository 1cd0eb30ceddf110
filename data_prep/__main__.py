"""`python -m data_prep <dataset> --src DIR --out DIR`: convert a raw dataset into WebDataset shards.

    python -m data_prep vitonhd --src /data/zalando-hd-resized --out shards/vitonhd --workers 8
    python -m data_prep synthetic --out shards/synthetic --count 256 --split all

Writes `<out>/<split>-%06d.tar` and `<out>/manifest.json` (see data_prep/manifest.py).
`python -m data_prep <dataset> --help` lists the dataset's own options.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from data_prep.manifest import check_out_dir, update_manifest
from data_prep.pipeline import convert_split
from data_prep.registry import CONVERTERS, get_converter
from leffa.errors import UserError, user_errors_as_one_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="{" + ",".join(CONVERTERS) + "}")
    for name, converter in CONVERTERS.items():
        sub = datasets.add_parser(name, help=converter.__doc__.splitlines()[0], description=converter.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        if name == "synthetic":  # generated: --src is accepted (Makefile passes it) and ignored
            sub.add_argument("--src", type=Path, nargs="?", default=None, help="ignored")
        else:
            sub.add_argument("--src", type=Path, required=True, help="raw dataset root folder")
        sub.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest.json")
        sub.add_argument(
            "--split", choices=(*converter.SPLITS, "all"), default="all", help="split to convert (default: all)"
        )
        sub.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
        sub.add_argument("--workers", type=int, default=0, help="loader processes; 0 loads in this process")
        sub.add_argument("--limit", type=int, default=None, help="convert only the first N samples of each split")
        converter.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run the converter named by argv[0]; return the final manifest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        get_converter(argv[0])  # unknown dataset: one ValueError that lists the valid ones
    args = build_parser().parse_args(argv)
    converter = get_converter(args.dataset)
    if args.src is not None and not args.src.is_dir():
        raise FileNotFoundError(f"--src {args.src} is not a folder")
    if args.shard_size < 1 or args.workers < 0 or (args.limit is not None and args.limit < 0):
        raise ValueError(
            f"need --shard-size >= 1, --workers >= 0, --limit >= 0; got {args.shard_size}, {args.workers}, {args.limit}"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is not a folder")
    splits = converter.SPLITS if args.split == "all" else (args.split,)
    # Everything that can refuse the run does so before the first shard is written: the output
    # folder's manifest and every split's pair files.
    check_out_dir(args.out, args.dataset, splits)
    split_specs = {split: converter.list_samples(args, split)[: args.limit] for split in splits}
    command = shlex.join(["python", "-m", "data_prep", *argv])
    source = str(args.src.resolve()) if args.src is not None else None
    manifest = {}
    for split, specs in split_specs.items():
        report = convert_split(converter, specs, args.out, split, args.shard_size, args.workers)
        manifest = update_manifest(
            args.out, args.dataset, split, report.manifest_entry(), report.skipped, source, command
        )
        print(f"{args.dataset} {split}: {report.num_samples_in} in, {report.num_written} written, "
              f"{report.num_skipped} skipped, {len(report.shards)} shards in {args.out}")  # fmt: skip
    return manifest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    user_errors_as_one_line(main, extra=(ValueError, FileNotFoundError))
