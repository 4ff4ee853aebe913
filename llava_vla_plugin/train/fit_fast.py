"""Fit the FAST action tokenizer (llava_vla_plugin/core/fast_codec.py) on the training windows of a converted
mixture, save it as OUT/vla_fast_tokenizer.json and report what it does to those windows.

    python -m llava_vla_plugin.train.fit_fast --data_path converted/mixture.yaml --horizon 8 --out fast/

The windows are the ones training would see with `--vla_horizon H --vla_window_mode MODE`: every action sample
of the mixture's files (a weight's copies included: they are how often training sees a window), cut at load
time from `<dataset>/<split>_actions.npz` by core/chunk_data.WindowSource, in the normalized units the
converter wrote. The report (OUT/fast_fit_report.json, also printed) gives tokens per chunk (mean, p50, p95,
max) against the H x D tokens of `bins_chunk`, and the round-trip error per dataset (mean and max absolute,
normalized units) beside the quantization bound, with the number of windows.

Exit codes: 0 done; 2 bad input (a missing or malformed mixture, data converted without per-episode action
files, no window at this horizon, a vocabulary too small for the coefficient range), with a message that
names the file and what to do.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from data_tools.action_windows import WINDOW_MODES
from data_tools.atomic import write_json
from data_tools.cli import add_common_flags, add_output, setup_logging

log = logging.getLogger("llava_vla_plugin.fit_fast")

REPORT_FILE = "fast_fit_report.json"


class FitInputError(ValueError):
    """Bad input: main() prints it and exits 2."""


def _stats(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "max": float(v.max())}


def collect_windows(data_path: str, horizon: int, window_mode: str, *, seed: int = 0, max_windows: int | None = None,
                    progress: bool = False) -> tuple[list[np.ndarray], list[str]]:
    """The training windows [H, D] of a mixture and the dataset each comes from (its converted folder's name).

    `max_windows` keeps a seeded subset of the samples (in order) before the windows are cut."""
    from tqdm import tqdm

    from data_tools.converted_format import is_action_sample
    from llava_vla_plugin.core.chunk_data import MissingEpisodeActionsError, WindowSource
    from llava_vla_plugin.core.training_data import load_data

    path = Path(data_path)
    if not path.is_file():
        raise FitInputError(f"{path} does not exist: pass a converted mixture (converted/mixture.yaml, written by "
                            "data_tools.convert) or one of its train.jsonl files as --data_path")
    try:
        store, _ = load_data(str(path), seed=seed)
    except (ValueError, FileNotFoundError) as e:
        raise FitInputError(f"{path}: {e}") from None
    source = WindowSource(horizon, window_mode)
    try:
        keep = np.flatnonzero(source.keep_mask(store))
    except (MissingEpisodeActionsError, ValueError) as e:
        raise FitInputError(str(e)) from None
    if max_windows is not None and max_windows < len(keep):
        keep = np.sort(np.random.default_rng(seed).permutation(keep)[:max_windows])
    windows, datasets = [], []
    for i in tqdm(keep.tolist(), desc="windows", unit="window", disable=not progress, file=sys.stderr):
        sample = store[i]
        if not is_action_sample(sample):
            continue
        try:
            windows.append(source.window(sample))
        except (MissingEpisodeActionsError, ValueError) as e:
            raise FitInputError(str(e)) from None
        datasets.append(str(sample.get("dataset") or Path(sample["_source"]).parent.name))
    if not windows:
        raise FitInputError(f"{path}: no training window with --horizon {horizon} --window_mode {window_mode} "
                            f"({len(store)} samples; the oft rule drops the last H-1 frames of each episode): use a "
                            "smaller --horizon, --window_mode openvla, or data with longer episodes")
    return windows, datasets


def fit_report(codec, windows: list[np.ndarray], datasets: list[str], *, progress: bool = False) -> dict:
    """Tokens per chunk and round-trip error of `codec` on the windows, overall and per dataset."""
    from tqdm import tqdm

    from llava_vla_plugin.core.fast_codec import round_trip_bound

    c = codec.config
    counts: dict[str, list[int]] = defaultdict(list)
    errors: dict[str, list[float]] = defaultdict(list)
    max_errors: dict[str, float] = defaultdict(float)
    invalid = clipped = 0
    for w, name in tqdm(list(zip(windows, datasets)), desc="round trip", unit="window", disable=not progress,
                        file=sys.stderr):
        enc = codec.encode_report(w)
        clipped += enc.clipped
        result = codec.decode(enc.tokens)
        invalid += not result.ok
        err = np.abs(result.actions.astype(np.float64) - np.asarray(w, np.float64))
        counts[name].append(len(enc.tokens))
        errors[name].append(float(err.mean()))
        max_errors[name] = max(max_errors[name], float(err.max()))
    every = [n for name in sorted(counts) for n in counts[name]]
    bound = round_trip_bound(c.horizon, c.scale)
    per_dataset = {name: {"windows": len(counts[name]), "tokens_per_chunk": _stats(counts[name]),
                          "round_trip_abs_error": {"mean": float(np.mean(errors[name])), "max": max_errors[name]}}
                   for name in sorted(counts)}
    return {
        "windows": len(every),
        "horizon": c.horizon, "action_dim": c.action_dim, "scale": c.scale,
        "vocab_size": c.vocab_size, "n_tokens": c.n_tokens, "min_token": c.min_token, "max_token": c.max_token,
        "bins_tokens_per_chunk": c.horizon * c.action_dim,
        "tokens_per_chunk": _stats(every),
        "compression_vs_bins": c.horizon * c.action_dim / float(np.mean(every)),
        "round_trip_bound": {"max_abs": bound.max_abs, "l2_per_dim": bound.l2_per_dim},
        "invalid_round_trips": int(invalid),
        "clipped_coefficients": int(clipped),
        "datasets": per_dataset,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_vla_plugin.train.fit_fast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_path", required=True, metavar="MIXTURE.yaml",
                   help="the training mixture (converted/mixture.yaml) or a converted train.jsonl, as training's --data_path")
    p.add_argument("--horizon", type=int, default=8, metavar="H", help="actions per chunk, as --vla_horizon (default 8)")
    p.add_argument("--window_mode", choices=WINDOW_MODES, default="oft",
                   help="how windows are cut, as --vla_window_mode (default oft)")
    p.add_argument("--vocab_size", type=int, default=1024, help="BPE vocabulary bound (default 1024, as FAST)")
    p.add_argument("--scale", type=float, default=10.0, help="DCT coefficient scale before rounding (default 10, as FAST)")
    p.add_argument("--seed", type=int, default=0, help="the mixture's weight sampling and --max_windows' subset (default 0)")
    p.add_argument("--max_windows", type=int, default=None,
                   help="fit and report on a seeded subset of this many windows (default: all)")
    add_output(p, help="folder for vla_fast_tokenizer.json and fast_fit_report.json", metavar="DIR")
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    if args.horizon < 1:
        parser.error(f"--horizon must be >= 1, got {args.horizon}")
    if args.vocab_size < 2 or not args.scale > 0:
        parser.error(f"--vocab_size must be >= 2 and --scale > 0 (got {args.vocab_size}, {args.scale})")
    if args.max_windows is not None and args.max_windows < 1:
        parser.error(f"--max_windows must be >= 1, got {args.max_windows}")
    from llava_vla_plugin.core.fast_codec import FastCodec, FastCodecError

    progress = not args.no_progress
    try:
        windows, datasets = collect_windows(args.data_path, args.horizon, args.window_mode, seed=args.seed,
                                            max_windows=args.max_windows, progress=progress)
        log.info("fitting FAST (vocab_size %d, scale %g) on %d windows [%d, %d]", args.vocab_size, args.scale,
                 len(windows), *windows[0].shape)
        try:
            # the BPE trainer's own bars write blank lines to stdout when it is not a terminal: terminals only
            codec = FastCodec.fit(windows, vocab_size=args.vocab_size, scale=args.scale, seed=args.seed,
                                  show_progress=progress and sys.stderr.isatty())
        except FastCodecError as e:
            raise FitInputError(f"{args.data_path}: {e}") from None
    except FitInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = {"data_path": str(Path(args.data_path).resolve()), "window_mode": args.window_mode, "seed": args.seed,
              **fit_report(codec, windows, datasets, progress=progress)}
    out = Path(args.out)
    tokenizer_path = codec.save(out)
    write_json(out / REPORT_FILE, report)
    print(_summary(report))
    print(f"wrote {tokenizer_path.resolve()}\nwrote {(out / REPORT_FILE).resolve()}")
    return 0


def _summary(report: dict) -> str:
    t = report["tokens_per_chunk"]
    lines = [f"FAST tokenizer: {report['n_tokens']} tokens (vocab_size {report['vocab_size']}, scale {report['scale']:g}), "
             f"H={report['horizon']} D={report['action_dim']}, {report['windows']} windows",
             f"tokens per chunk: mean {t['mean']:.2f}  p50 {t['p50']:g}  p95 {t['p95']:.2f}  max {t['max']:g}  "
             f"(bins: {report['bins_tokens_per_chunk']}; {report['compression_vs_bins']:.2f}x fewer)",
             f"round-trip bound (normalized units): max abs {report['round_trip_bound']['max_abs']:.4f}",
             f"{'dataset':<32} {'windows':>8} {'tokens':>7} {'mean abs err':>13} {'max abs err':>12}"]
    for name, d in report["datasets"].items():
        lines.append(f"{name:<32} {d['windows']:>8} {d['tokens_per_chunk']['mean']:>7.2f} "
                     f"{d['round_trip_abs_error']['mean']:>13.5f} {d['round_trip_abs_error']['max']:>12.5f}")
    if report["invalid_round_trips"] or report["clipped_coefficients"]:
        lines.append(f"warning: {report['invalid_round_trips']} invalid round trips, "
                     f"{report['clipped_coefficients']} clipped coefficients")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
