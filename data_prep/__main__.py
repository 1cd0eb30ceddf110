"""`python -m data_prep <dataset> --src DIR --out DIR`: convert a raw dataset into WebDataset shards.

    python -m data_prep vitonhd --src /data/zalando-hd-resized --out shards/vitonhd --workers 8
    python -m data_prep synthetic --out shards/synthetic --count 256 --split all

Writes `<out>/<split>-%06d.tar` and `<out>/manifest.json` (see leffa/manifest.py).
`python -m data_prep <dataset> --help` lists the dataset's own options.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from functools import partial
from pathlib import Path
from types import ModuleType

from data_prep.split_conversion import SplitReport, convert_split
from data_prep.registry import CONVERTERS, get_converter
from leffa.errors import UserError, user_errors_as_one_line
from leffa.manifest import check_out_dir, discard_staged_manifest, publish_manifest, stage_manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.splitlines()[0])
    datasets = parser.add_subparsers(dest="dataset", required=True, metavar="{" + ",".join(CONVERTERS) + "}")
    for name, converter in CONVERTERS.items():
        sub = datasets.add_parser(name, help=converter.__doc__.splitlines()[0], description=converter.__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        converter.add_arguments(sub)  # its --src and its own options
        sub.add_argument("--out", type=Path, required=True, help="output folder for shards and manifest.json")
        sub.add_argument(
            "--split", choices=(*converter.SPLITS, "all"), default="all", help="split to convert (default: all)"
        )
        sub.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
        sub.add_argument("--workers", type=int, default=0, help="loader processes; 0 loads in this process")
        sub.add_argument("--limit", type=int, default=None, help="convert only the first N samples of each split")
    return parser


def check_out_path(args: argparse.Namespace, source_options: tuple[str, ...]) -> None:
    """Refuse (UserError) an --out that is, or lies inside, --src (or another of the converter's
    `source_options`, e.g. DeepFashion's --images: the shards would mix with the dataset's files),
    or that cannot be created or written (checked on its nearest existing folder). Symbolic links
    and `..` are resolved first."""
    out = args.out
    resolved = out.resolve()
    for option in source_options:
        source = getattr(args, option, None)
        if source is not None and (resolved == source.resolve() or source.resolve() in resolved.parents):
            raise UserError(f"--out {out} is inside --{option} {source} (the shards would mix with the dataset's "
                            "files); choose a folder outside it")  # fmt: skip
    existing = next(folder for folder in (resolved, *resolved.parents) if folder.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write in {existing} (no write permission, or a read-only file system); "
                        "choose another --out")  # fmt: skip


def zero_samples_reason(args: argparse.Namespace, converter: ModuleType) -> str:
    """Why a split has no sample to convert, in the user's terms."""
    return "--limit 0" if args.limit == 0 else converter.no_samples_reason(args)


def _stage_split_manifest(
    staged: list[dict], args: argparse.Namespace, split: str, source: str | None, command: str, report: SplitReport
) -> None:
    """convert_split's before_commit: the manifest with this split, under its temporary name."""
    entry = report.manifest_entry()
    staged.append(stage_manifest(args.out, args.dataset, split, entry, report.skipped, source, command))


def main(argv: list[str] | None = None) -> dict:
    """Run the converter named by argv[0]; return the final manifest."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        get_converter(argv[0])  # unknown dataset: one ValueError that lists the valid ones
    args = build_parser().parse_args(argv)
    converter = get_converter(args.dataset)
    src = args.src if "src" in converter.SOURCE_OPTIONS else None  # the dataset root; a generated set has none
    if src is not None and not src.is_dir():
        raise FileNotFoundError(f"--src {src} is not a folder")
    if args.shard_size < 1 or args.workers < 0 or (args.limit is not None and args.limit < 0):
        raise ValueError(
            f"need --shard-size >= 1, --workers >= 0, --limit >= 0; got {args.shard_size}, {args.workers}, {args.limit}"
        )
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is not a folder")
    check_out_path(args, converter.SOURCE_OPTIONS)
    splits = converter.SPLITS if args.split == "all" else (args.split,)
    # Everything that can refuse the run does so before the first shard is written: the output
    # folder's manifest and every split's pair files and sample count.
    check_out_dir(args.out, args.dataset, splits)
    split_specs = {split: converter.list_samples(args, split)[: args.limit] for split in splits}
    empty = [split for split, specs in split_specs.items() if not specs]
    if empty:
        raise UserError(f"{args.dataset}: no {empty[0]} samples to convert ({zero_samples_reason(args, converter)}); "
                        "nothing was written")  # fmt: skip
    command = shlex.join(["python", "-m", "data_prep", *argv])
    source = str(src.resolve()) if src is not None else None
    manifest = {}
    for split, specs in split_specs.items():
        # Commit order: shards complete under temporary names -> the new manifest written in full
        # under its temporary name -> shards renamed (stale ones deleted) -> manifest renamed. A
        # full disk fails one of the first two writes, and then no shard has been renamed: the
        # folder stays as it was (the previous shards and manifest, byte for byte) and a rerun is
        # accepted. Renames need no space; only a kill between the shard renames and the manifest
        # rename leaves new shards beside the previous manifest (or none, on a first run: see
        # manifest.check_out_dir).
        staged: list[dict] = []  # the new manifest, once written under its temporary name
        stage = partial(_stage_split_manifest, staged, args, split, source, command)
        try:
            report = convert_split(converter, specs, args.out, split, args.shard_size, args.workers, stage)
            publish_manifest(args.out)
        finally:
            discard_staged_manifest(args.out)  # after a failure; nothing left once published
        (manifest,) = staged
        print(f"{args.dataset} {split}: {report.num_samples_in} in, {report.num_written} written, "
              f"{report.num_skipped} skipped, {len(report.shards)} shards in {args.out}")  # fmt: skip
    return manifest


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    user_errors_as_one_line(main, extra=(ValueError, FileNotFoundError))
