"""The one flag convention of every command-line tool (data_tools.* and llava_vla_plugin.*).

    input   positional, or --data-dir (the same thing, for tools whose input is a folder)
    output  --out  (older spellings such as --dest, --report, -o/--output stay as aliases)
    --no-progress   no progress bars (also for the processes a tool starts: sets TQDM_DISABLE=1)
    -v/--verbose    debug logging

Defined once here so that the tools cannot drift apart; tests/test_cli_flags.py checks every tool.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

__all__ = ["add_common_flags", "add_input", "add_output", "parse_converted_input", "resolve_input", "setup_logging"]


def add_common_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--no-progress and -v/--verbose, with the same meaning in every tool."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (here and in the processes this tool starts)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def add_input(parser: argparse.ArgumentParser, help: str, *, required: bool = True) -> None:
    """The input folder as a positional argument or as --data-dir (either one; see resolve_input)."""
    parser.add_argument("input", nargs="?", type=Path, default=None, metavar="DATA_DIR", help=help)
    parser.add_argument("--data-dir", dest="data_dir_opt", type=Path, default=None, metavar="DATA_DIR",
                        help="the same as the positional DATA_DIR")
    parser.set_defaults(_input_required=required)


def resolve_input(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Path | None:
    """The input given either way; a usage error (exit 2) when it is missing or given twice, differently."""
    pos, opt = args.input, args.data_dir_opt
    if pos is not None and opt is not None and pos != opt:
        parser.error(f"give the input once: positional {pos} and --data-dir {opt} differ")
    value = pos if pos is not None else opt
    if value is None and getattr(args, "_input_required", True):
        parser.error("the input folder is required (positional DATA_DIR or --data-dir)")
    args.input = value
    return value


def parse_converted_input(parser: argparse.ArgumentParser, argv) -> tuple[argparse.Namespace, Path | None]:
    """Parse a tool whose input is a converted directory (validate, stats): logging set up, the input resolved
    and checked to hold finished datasets (*/manifest.json). (args, None) after printing why when it holds
    none; the tool then exits 2."""
    from data_tools.converted_format import MANIFEST_FILE, converted_dataset_dirs

    args = parser.parse_args(argv)
    converted = resolve_input(parser, args)
    setup_logging(args)
    if converted is None or not converted.is_dir() or not converted_dataset_dirs(converted):
        print(f"error: {converted} holds no converted dataset (*/{MANIFEST_FILE})", file=sys.stderr)
        return args, None
    return args, converted


def add_output(parser: argparse.ArgumentParser, *aliases: str, help: str, required: bool = True,
               type: type = Path, default: object = None, metavar: str = "OUT") -> None:
    """--out, plus the tool's older spellings as aliases (argparse maps them all to args.out)."""
    parser.add_argument("--out", *aliases, dest="out", type=type, required=required, default=default,
                        metavar=metavar, help=help + (f" (also: {', '.join(aliases)})" if aliases else ""))


def setup_logging(args: argparse.Namespace, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
    """Logging level from -v; --no-progress also reaches child processes through TQDM_DISABLE."""
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO, format=fmt)
    if getattr(args, "no_progress", False):
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it: bars in child processes go quiet too
