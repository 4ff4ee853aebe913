"""`vla-import`: bring your own robot data into the converted format (the same files `vla-convert` writes).

    vla-import lerobot PATH --out converted/ [--name NAME] [--mapping mapping.yaml] [--workers N]
    vla-import hdf5 FILE_OR_FOLDER --out converted/ [--name NAME] [--preset libero|robomimic] [--instruction TEXT]

Then `vla-validate converted/`, `vla-mixture`, and the launcher with DATA=converted/mixture.yaml, as for RLDS.
The Python API is `data_tools.byod.write_episodes`. Flags follow data_tools/cli.py: the input positional or
--data-dir, --out, --no-progress, -v. Exit codes: 0 imported (or already imported with the same inputs),
1 the import failed (bad data: the message names the file, episode and key; finished episodes are kept and a
rerun resumes), 2 usage error (a missing input, a bad mapping, --out not writable).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from data_tools.cli import add_common_flags, add_input, add_output, resolve_input, setup_logging

log = logging.getLogger("data_tools.import")


def _common(p: argparse.ArgumentParser, what: str) -> None:
    add_input(p, what)
    add_output(p, help="converted directory to write into (OUT/<name>/...; other datasets there are kept)")
    p.add_argument("--name", default=None, help="dataset name = folder under OUT and unnorm_key (default: the input's name)")
    p.add_argument("--mapping", type=Path, default=None,
                   help="YAML mapping of views / state / action / instruction / orientation / convention "
                        "(default: the format's defaults, see the README)")
    p.add_argument("--workers", type=int, default=1, help="parallel processes over episodes (default 1)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="last fraction of the episodes held out as val (default 0.05: OpenVLA's train[95%%:])")
    p.add_argument("--overwrite", action="store_true", help="discard an earlier import / partial run of this name")
    add_common_flags(p)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vla-import", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit codes: 0 imported, 1 import failed (named file/episode/key), 2 usage error.")
    sub = p.add_subparsers(dest="format", required=True, metavar="{lerobot,hdf5}")
    lr = sub.add_parser("lerobot", help="a local LeRobotDataset folder (v2.1 or v3.0)",
                        description="Import a local LeRobotDataset (v2.1 or v3.0): parquet + mp4 read directly.")
    _common(lr, "the LeRobotDataset folder (holds meta/info.json)")
    h5 = sub.add_parser("hdf5", help="robomimic / LIBERO HDF5 demonstrations",
                        description="Import robomimic / LIBERO HDF5 files (data/demo_*/obs/*, actions).")
    _common(h5, "an .hdf5 file or a folder of them")
    h5.add_argument("--preset", default="libero", choices=["libero", "robomimic"],
                    help="defaults for keys, orientation and action convention (default libero)")
    h5.add_argument("--instruction", default=None,
                    help="the instruction of every demo (robomimic files carry none; overrides LIBERO's problem_info)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from data_tools.atomic import OutputWriteError
    from data_tools.byod import ImportInputError, ImportOptions, import_source
    from data_tools.byod_mapping import MappingError, load_mapping

    parser = build_parser()
    args = parser.parse_args(argv)
    src_path = resolve_input(parser, args)
    setup_logging(args)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if not src_path.exists():
        print(f"error: {src_path}: no such file or folder", file=sys.stderr)
        return 2
    name = args.name or src_path.resolve().stem
    try:
        if args.format == "lerobot":
            from data_tools.import_lerobot import DEFAULTS, LeRobotSource

            source = LeRobotSource(src_path, load_mapping(args.mapping, DEFAULTS))
        else:
            from data_tools.import_hdf5 import PRESETS, Hdf5Source, make_mapping

            mapping = make_mapping(args.preset, load_mapping(args.mapping, PRESETS[args.preset]), args.instruction)
            source = Hdf5Source(src_path, mapping, args.preset)
    except (MappingError, ImportInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: --out {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    started = time.time()
    try:
        manifest = import_source(source, args.out, name, source.mapping,
                                 ImportOptions(args.val_fraction, args.workers, args.overwrite, not args.no_progress))
    except (ImportInputError, OutputWriteError) as e:
        print(f"error: {name}: {e}", file=sys.stderr)
        return 1
    splits = manifest["counts"]["splits"]
    print(f"{name}: train {splits['train']['frames']} frames, val {splits['val']['frames']} frames "
          f"({manifest['counts']['num_trajectories']} episodes) -> {args.out / name} in {time.time() - started:.1f}s")
    for w in manifest.get("warnings", []):
        print(f"warning: {w}", file=sys.stderr)
    print(f"next: vla-validate {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
