"""Check a converted output directory: python -m data_tools.validate OUT

Every image exists and decodes, every sample has exactly one <image> (leading the human turn), 7 finite
normalized actions in [-1, 1] consistent with action_raw and the statistics, provenance fields agree with
the id and image path, statistics exist for every dataset, and per-split counts match the manifest.
Exit code 0: no problems; 1: problems found (listed); 2: OUT is not a converted directory.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data_tools.cli import add_common_flags, add_input, parse_converted_input
from data_tools.converted_format import (
    MANIFEST_FILE,
    MIXTURE_FILE,
    SPLITS,
    STATISTICS_FILE,
    converted_dataset_dirs,
    human_turn,
    image_path,
    sample_id,
    split_file,
    wrist_image_path,
)
from data_tools.normalize import normalize_bounds_q99

MAX_LISTED = 20


class Report:
    def __init__(self) -> None:
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, kind: str, message: str) -> None:
        self.counts[kind] += 1
        if len(self.problems[kind]) < MAX_LISTED:
            self.problems[kind].append(message)

    @property
    def ok(self) -> bool:
        return not self.counts


def _check_image(path: Path, decode: bool) -> str | None:
    if not path.is_file():
        return "missing"
    if not decode:
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as e:  # noqa: BLE001
        return f"does not decode: {e}"
    return None


def _finite_list(value: Any, n: int = 7) -> bool:
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
    )


def validate_dataset(out: Path, ds_dir: Path, combined: dict[str, Any] | None, rep: Report, decode: bool) -> dict[str, int]:
    name = ds_dir.name
    manifest = json.loads((ds_dir / MANIFEST_FILE).read_text())
    stats_file = ds_dir / STATISTICS_FILE
    stats = None
    if not stats_file.is_file():
        rep.add("statistics", f"{name}: no {STATISTICS_FILE}")
    else:
        stats = json.loads(stats_file.read_text()).get(name)
        if stats is None:
            rep.add("statistics", f"{name}: {STATISTICS_FILE} has no entry {name!r}")
    if combined is not None and name not in combined:
        rep.add("statistics", f"{name}: missing from the top-level {STATISTICS_FILE}")
    seen: set[str] = set()
    lines_per_split: dict[str, int] = {}
    for split in SPLITS:
        path = ds_dir / split_file(split)
        if not path.is_file():
            rep.add("files", f"{name}: no {split_file(split)}")
            continue
        n = 0  # samples: lines that parse (an unreadable line is a problem, not a sample)
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                where = f"{path.relative_to(out)}:{lineno}"
                try:
                    s = json.loads(line)
                except ValueError as e:
                    detail = f"{e.msg} at character {e.pos}" if isinstance(e, json.JSONDecodeError) else str(e)
                    rep.add("json", f"{where}: not a sample: the line is not valid JSON ({detail}; a truncated or "
                                    f"damaged line). Not counted; convert {name} again with --overwrite, or remove the line")
                    continue
                n += 1
                _check_sample(out, name, split, s, where, stats, seen, rep, decode)
        lines_per_split[split] = n
        expected = manifest.get("counts", {}).get("splits", {}).get(split, {}).get("frames")
        if expected is not None and expected != n:
            rep.add("counts", f"{name}/{split}: {n} samples, manifest says {expected}")
    return lines_per_split


def _check_sample(
    out: Path, name: str, split: str, s: Any, where: str, stats: Any, seen: set[str], rep: Report, decode: bool
) -> None:
    if not isinstance(s, dict):
        rep.add("format", f"{where}: not an object")
        return
    missing = [k for k in ("id", "image", "conversations", "dataset", "split", "episode", "step", "action_raw") if k not in s]
    if missing:
        rep.add("format", f"{where}: missing {missing}")
        return
    sid = s["id"]
    if sid in seen:
        rep.add("duplicates", f"{where}: duplicate id {sid}")
    seen.add(sid)
    ep, step = s["episode"], s["step"]
    if not (isinstance(ep, int) and isinstance(step, int) and ep >= 0 and step >= 0):
        rep.add("provenance", f"{where}: episode/step must be non-negative integers")
    else:
        if s["dataset"] != name or s["split"] != split:
            rep.add("provenance", f"{where}: dataset/split {s['dataset']}/{s['split']} in {name}/{split_file(split)}")
        if sid != sample_id(name, split, ep, step):
            rep.add("provenance", f"{where}: id {sid} does not match dataset/split/episode/step")
        if s["image"] != image_path(name, split, ep, step):
            rep.add("provenance", f"{where}: image path {s['image']} does not match the provenance")
    conv = s["conversations"]
    if not (isinstance(conv, list) and len(conv) == 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt"):
        rep.add("format", f"{where}: conversations must be [human, gpt]")
        return
    human = conv[0].get("value", "")
    if not isinstance(human, str) or human.count("<image>") != 1 or not human.startswith("<image>\n"):
        rep.add("image_token", f"{where}: the human turn must start with '<image>\\n' and hold exactly one <image>")
    elif isinstance(s.get("instruction"), str) and human != human_turn(s["instruction"]):
        rep.add("format", f"{where}: the human turn is not the prompt of the sample's `instruction`")
    action = conv[1].get("value")
    if not _finite_list(action):
        rep.add("action", f"{where}: gpt value must be 7 finite numbers")
    elif any(abs(v) > 1.0 for v in action):
        rep.add("action", f"{where}: normalized action outside [-1, 1]")
    if not _finite_list(s["action_raw"]):
        rep.add("action", f"{where}: action_raw must be 7 finite numbers")
    elif stats is not None and _finite_list(action):
        expect = normalize_bounds_q99(np.asarray([s["action_raw"]], np.float32), stats)[0]
        if np.max(np.abs(expect - np.asarray(action, np.float32))) > 1e-5:
            rep.add("action", f"{where}: gpt value is not action_raw normalized with the dataset statistics")
    err = _check_image(out / s["image"], decode)
    if err:
        rep.add("images", f"{where}: image {s['image']} {err}")
    wrist = s.get("image_wrist")  # optional: absent = no wrist frame (OpenVLA's zero image), old data included
    if wrist is not None:
        if isinstance(ep, int) and isinstance(step, int) and wrist != wrist_image_path(name, split, ep, step):
            rep.add("provenance", f"{where}: image_wrist path {wrist} does not match the provenance")
        else:
            err = _check_image(out / str(wrist), decode)
            if err:
                rep.add("images", f"{where}: image_wrist {wrist} {err}")


def validate(out: Path, decode: bool = True) -> tuple[Report, dict[str, dict[str, int]]]:
    rep = Report()
    combined = None
    top = out / STATISTICS_FILE
    if top.is_file():
        combined = json.loads(top.read_text())
    else:
        rep.add("files", f"no top-level {STATISTICS_FILE}")
    if not (out / MIXTURE_FILE).is_file():
        rep.add("files", f"no top-level {MIXTURE_FILE}")
    datasets = converted_dataset_dirs(out)
    summary = {}
    for ds in datasets:
        summary[ds.name] = validate_dataset(out, ds, combined, rep, decode)
    if combined is not None:
        for name in combined:
            if not (out / name / MANIFEST_FILE).is_file():
                rep.add("files", f"statistics for {name} but no converted dataset directory")
    return rep, summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.validate", description=__doc__.split("\n\n")[1],
                                epilog="Exit codes: 0 valid, 1 problems found, 2 not a converted directory.")
    add_input(p, "output directory of data_tools.convert (positional or --data-dir)")
    p.add_argument("--no-decode", action="store_true", help="only check that images exist (faster)")
    add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, converted = parse_converted_input(build_parser(), argv)
    if converted is None:
        return 2
    rep, summary = validate(converted, decode=not args.no_decode)
    for name, splits in summary.items():
        print(f"{name}: " + ", ".join(f"{s} {n} samples" for s, n in splits.items()))
    if rep.ok:
        print(f"OK: {sum(sum(v.values()) for v in summary.values())} samples in {len(summary)} datasets")
        return 0
    for kind, msgs in rep.problems.items():
        print(f"PROBLEM [{kind}] x{rep.counts[kind]}")
        for m in msgs:
            print(f"  {m}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
