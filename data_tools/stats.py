"""Summarise a converted directory: python -m data_tools.stats OUT [--plot DIR]

Prints a table (samples, episodes, per-dimension normalized action mean/std) per dataset and split;
with --plot, writes one PNG of action histograms per dataset (normalized and raw, 7 dims) and table.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data_tools.cli import add_common_flags, add_input, add_output, parse_converted_input
from data_tools.converted_format import SPLITS, TRAIN_FILE, converted_dataset_dirs, sample_action, split_file

DIMS = ["x", "y", "z", "roll", "pitch", "yaw", "grip"]


def load_actions(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    norm, raw, episodes = [], [], set()
    if path.is_file():
        with open(path) as f:
            for line in f:
                s = json.loads(line)
                norm.append(sample_action(s))
                raw.append(s["action_raw"])
                episodes.add(s["episode"])
    return np.asarray(norm, np.float32).reshape(-1, 7), np.asarray(raw, np.float32).reshape(-1, 7), len(episodes)


def table(out: Path) -> list[dict]:
    rows = []
    for ds in converted_dataset_dirs(out):
        for split in SPLITS:
            norm, _, episodes = load_actions(ds / split_file(split))
            rows.append({
                "dataset": ds.name, "split": split, "samples": len(norm), "episodes": episodes,
                "mean": norm.mean(0).round(3).tolist() if len(norm) else [],
                "std": norm.std(0).round(3).tolist() if len(norm) else [],
            })
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| dataset | split | samples | episodes | mean (normalized, 7 dims) | std |\n|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['dataset']} | {r['split']} | {r['samples']} | {r['episodes']} | "
        f"{' '.join(f'{v:+.3f}' for v in r['mean'])} | {' '.join(f'{v:.3f}' for v in r['std'])} |\n"
        for r in rows
    )
    return head + body


def plot(out: Path, plot_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in converted_dataset_dirs(out):
        norm, raw, _ = load_actions(ds / TRAIN_FILE)
        fig, axes = plt.subplots(2, 7, figsize=(21, 5.5))
        for row, (values, label) in enumerate(((norm, "normalized"), (raw, "raw"))):
            for d in range(7):
                ax = axes[row, d]
                if len(values):
                    ax.hist(values[:, d], bins=50, color="tab:blue" if row == 0 else "tab:orange")
                ax.set_title(f"{DIMS[d]} ({label})", fontsize=9)
        fig.suptitle(f"{ds.name} train actions ({len(norm)} samples)")
        fig.tight_layout()
        path = plot_dir / f"{ds.name}_actions.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.stats", description=__doc__.split("\n\n")[1],
                                epilog="Exit codes: 0 printed, 2 not a converted directory.")
    add_input(p, "output directory of data_tools.convert (positional or --data-dir)")
    add_output(p, "--plot", required=False, metavar="DIR", help="write PNG histograms and table.md here")
    add_common_flags(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args, converted = parse_converted_input(build_parser(), argv)
    if converted is None:
        return 2
    text = format_table(table(converted))
    print(text)
    if args.out:
        for path in plot(converted, args.out):
            print(f"wrote {path}")
        (args.out / "table.md").write_text(text)
        print(f"wrote {args.out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
