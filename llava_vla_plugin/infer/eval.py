"""Offline evaluation of a VLA checkpoint on held-out converted samples (docs/DESIGN.md 2.1, 2.6).

    python -m llava_vla_plugin.infer.eval --checkpoint runs/ov-vla \\
        --data converted/bridge_orig/val.jsonl converted/fractal20220817_data/val.jsonl \\
        --image-folder converted [--max-samples 500] [--batch-size 8] --report runs/ov-vla/eval

Each sample is run through VLAPolicy exactly as a robot would (constrained greedy generation,
decode, un-normalize with the sample's dataset statistics) and compared with its labels. Per
dataset (the sample's `dataset` field) and per action dimension:
  action_accuracy_generated  predicted action token == the label's token (the bin of the normalized
                          value), tokens generated greedily among the action tokens, each after the
                          model's own previous picks; continuous heads (parallel_l1): the prediction's
                          bin. Chunked checkpoints are scored on chunk step 0 (the sample's own step).
                          Training's validation logs teacher-forced accuracies instead
                          (llava_vla_plugin.train.trainer.METRIC_DOC); this one is what a robot gets.
                          (Called action_token_accuracy before.)
  l1_normalized           |predicted bin centre - normalized label| (the label as in the data, [-1, 1])
  l1_unnormalized         |un-normalized prediction - action_raw| (the raw action when the sample has
                          it, else the un-normalized label)
  gripper_accuracy        last dimension, both sides thresholded at 0.5 (OpenVLA's 0/1 gripper),
                          un-normalized units
  samples_per_s           predictions per second (model time incl. image preprocessing, not file I/O)
Writes DIR/report.json, DIR/report.png (per-dimension error; predicted vs true) and
DIR/predictions.jsonl (one line per sample). Exit codes: 0 done, 1 bad data or checkpoint, 2 usage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data_tools.cli import add_common_flags, add_output, setup_logging
from data_tools.converted_format import SampleFormatError, is_action_sample, sample_action
from data_tools.converted_format import sample_instruction as _sample_instruction
from llava_vla_plugin.core.training_data import read_samples

GRIPPER_THRESHOLD = 0.5


class EvalDataError(ValueError):
    pass


def sample_instruction(sample: dict, template: str) -> str:
    """The instruction the training prompt was built from (data_tools.converted_format owns the rule)."""
    try:
        return _sample_instruction(sample, template)
    except SampleFormatError as e:
        raise EvalDataError(str(e)) from None


def load_eval_samples(paths: list[str], image_folder: str, max_samples: int | None, action_dim: int) -> list[dict]:
    """Samples with an image and a numeric action of the right size, up to max_samples per file."""
    out = []
    for path in paths:
        taken = 0
        for i, s in enumerate(read_samples(Path(path))):
            if max_samples is not None and taken >= max_samples:
                break
            if not is_action_sample(s) or "image" not in s:
                continue  # not a VLA sample (co-training data): nothing to score
            action = sample_action(s)
            if len(action) != action_dim:
                raise EvalDataError(f"{path}: sample {s.get('id', i)} has a {len(action)}-d action, the model predicts {action_dim}")
            name = s.get("dataset") or Path(path).parent.name
            image = os.path.join(image_folder, s["image"])
            if not os.path.exists(image):
                raise EvalDataError(f"{path}: sample {s.get('id', i)}: image {image} does not exist (check --image-folder)")
            out.append({"id": s.get("id", f"{path}:{i}"), "dataset": name, "image": image, "sample": s,
                        "action": np.asarray(action, dtype=np.float64),
                        "action_raw": np.asarray(s["action_raw"], dtype=np.float64) if s.get("action_raw") is not None else None})
            taken += 1
    return out


def summarize(pred_bins, true_bins, pred_norm, true_norm, pred_raw, true_raw, seconds: float) -> dict:
    pred_bins, true_bins = np.asarray(pred_bins), np.asarray(true_bins)
    correct = pred_bins == true_bins
    l1n = np.abs(np.asarray(pred_norm) - np.asarray(true_norm))
    l1u = np.abs(np.asarray(pred_raw) - np.asarray(true_raw))
    grip = (np.asarray(pred_raw)[:, -1] > GRIPPER_THRESHOLD) == (np.asarray(true_raw)[:, -1] > GRIPPER_THRESHOLD)
    n = len(pred_bins)
    return {
        "n": n,
        "action_accuracy_generated": float(correct.mean()),
        "action_accuracy_generated_per_dim": correct.mean(0).tolist(),
        "l1_normalized": float(l1n.mean()),
        "l1_normalized_per_dim": l1n.mean(0).tolist(),
        "l1_unnormalized": float(l1u.mean()),
        "l1_unnormalized_per_dim": l1u.mean(0).tolist(),
        "gripper_accuracy": float(grip.mean()),
        "seconds": seconds,
        "samples_per_s": n / seconds if seconds > 0 else float("nan"),
    }


def plot_report(report: dict, arrays: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["datasets"])
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        r, a = report["datasets"][name], arrays[name]
        dims = np.arange(len(r["l1_normalized_per_dim"]))
        ax = row[0]
        ax.bar(dims - 0.2, r["l1_normalized_per_dim"], width=0.4, label="L1 normalized")
        ax.bar(dims + 0.2, 1 - np.asarray(r["action_accuracy_generated_per_dim"]), width=0.4, label="token error rate")
        ax.set_xticks(dims)
        ax.set_xlabel("action dimension")
        ax.set_title(f"{name}, {r['action_repr']}: per-dimension error (n={r['n']})")
        ax.legend()
        ax = row[1]
        for d in dims:
            ax.scatter(a["true_norm"][:, d], a["pred_norm"][:, d], s=12, alpha=0.7, label=f"dim {d}")
        ax.plot([-1, 1], [-1, 1], "k--", linewidth=0.8)
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        ax.set_xlabel("true (normalized)")
        ax.set_ylabel("predicted (normalized)")
        ax.set_title(f"{name}: predicted vs true")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def evaluate(policy, samples: list[dict], batch_size: int = 8, progress: bool = True,
             unnorm_key: str | None = None) -> tuple[dict, dict, list[dict]]:
    """-> (per-dataset summaries, per-dataset arrays for plotting, per-sample predictions).

    Each dataset is un-normalized with its own statistics (the sample's `dataset` name), or with
    `unnorm_key`'s for all when given."""
    from PIL import Image
    from tqdm import tqdm

    from llava_vla_plugin.core.normalization import resolve_unnorm_key

    at = policy.action_tokenizer
    template = at.prompt
    by_ds: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        by_ds[s["dataset"]].append(s)
    keys = {}
    for name in by_ds:
        try:
            keys[name] = resolve_unnorm_key(policy.norm_stats, unnorm_key or name)
        except KeyError as e:
            raise EvalDataError(f"samples of dataset {name!r} cannot be un-normalized: {e} "
                                "(--unnorm-key picks the statistics for all samples)") from None

    summaries, arrays, rows = {}, {}, []
    bar = tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress, file=sys.stderr)
    for name, group in by_ds.items():
        pred_steps, seconds = [], 0.0
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            images = []
            for s in batch:
                with Image.open(s["image"]) as im:
                    images.append(im.convert("RGB"))
            instructions = [sample_instruction(s["sample"], template) for s in batch]
            t0 = time.perf_counter()
            # [B, H, D] from the checkpoint's representation; a sample's label is its own step: chunk step 0 is scored
            pred_steps.append(policy.predict_normalized(images, instructions)[:, 0])
            seconds += time.perf_counter() - t0
            bar.update(len(batch))
        pred_norm = np.concatenate(pred_steps)
        pred_bins = at.encode(pred_norm)  # for token representations the decoded bin centres encode to their own bins
        ids = pred_bins + at.token_ids[0]
        true_norm = np.stack([s["action"] for s in group])
        true_bins = at.encode(true_norm)
        key = keys[name]
        pred_raw = policy.unnormalize(pred_norm, key)
        true_raw = np.stack([s["action_raw"] if s["action_raw"] is not None else policy.unnormalize(s["action"], key)
                             for s in group])
        summaries[name] = {"unnorm_key": key, "action_repr": policy.action_repr.describe(), **summarize(pred_bins, true_bins, pred_norm, true_norm, pred_raw, true_raw, seconds)}
        arrays[name] = {"pred_norm": pred_norm, "true_norm": true_norm}
        for s, i, pn, pr, tr in zip(group, ids, pred_norm, pred_raw, true_raw):
            rows.append({"id": s["id"], "dataset": name, "action_repr": policy.action_repr.describe(), "pred_token_ids": i.tolist(), "pred_normalized": pn.tolist(),
                         "pred_action": pr.tolist(), "true_normalized": s["action"].tolist(), "true_action": tr.tolist()})
    bar.close()
    return summaries, arrays, rows


def overall(summaries: dict) -> dict:
    """Sample-weighted means over datasets."""
    n = sum(s["n"] for s in summaries.values())
    out = {"n": n}
    for key in ("action_accuracy_generated", "l1_normalized", "l1_unnormalized", "gripper_accuracy"):
        out[key] = sum(s[key] * s["n"] for s in summaries.values()) / n
    seconds = sum(s["seconds"] for s in summaries.values())
    out["seconds"] = seconds
    out["samples_per_s"] = n / seconds if seconds > 0 else float("nan")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_vla_plugin.infer.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory")
    parser.add_argument("--data", required=True, nargs="+", help="converted val.jsonl file(s)")
    parser.add_argument("--image-folder", required=True, help="folder the samples' image paths are relative to (the converter's OUT)")
    add_output(parser, "--report", type=str, help="output folder for report.json, report.png, predictions.jsonl")
    parser.add_argument("--max-samples", type=int, default=None, help="at most this many samples per data file")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call (default 8)")
    parser.add_argument("--unnorm-key", default=None, help="statistics for all samples (default: each sample's `dataset`)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    add_common_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args)
    if args.max_samples is not None and args.max_samples < 1:
        parser.error("--max-samples must be >= 1")
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")

    from llava_vla_plugin.core.action_tokenizer import ActionTokenizer

    try:
        action_dim = ActionTokenizer.load(args.checkpoint).action_dim
        samples = load_eval_samples(args.data, args.image_folder, args.max_samples, action_dim)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not samples:
        print(f"error: no VLA samples (image + numeric action) in {args.data}", file=sys.stderr)
        return 1

    from llava_vla_plugin.infer.pipeline import VLAPolicy

    try:
        policy = VLAPolicy.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype)
        summaries, arrays, rows = evaluate(policy, samples, args.batch_size, progress=not args.no_progress,
                                           unnorm_key=args.unnorm_key)
    except (OSError, EvalDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "checkpoint": str(args.checkpoint),
        "data": [str(p) for p in args.data],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "action_repr": {**asdict(policy.action_repr.config), "describe": policy.action_repr.describe()},
        "device": str(policy.device), "dtype": str(policy.dtype), "batch_size": args.batch_size,
        "gripper_threshold": GRIPPER_THRESHOLD,
        "overall": overall(summaries),
        "datasets": summaries,
        "figure": "report.png",
        "predictions": "predictions.jsonl",
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_report(report, arrays, out / "report.png")
    o = report["overall"]
    print(f"{report['action_repr']['describe']}: {o['n']} samples, {o['samples_per_s']:.2f} samples/s: generated token accuracy {o['action_accuracy_generated']:.3f}, "
          f"L1 normalized {o['l1_normalized']:.4f}, L1 {o['l1_unnormalized']:.4f}, gripper accuracy {o['gripper_accuracy']:.3f}")
    for name, s in summaries.items():
        print(f"  {name} ({s['action_repr']}): n={s['n']} token acc {s['action_accuracy_generated']:.3f}  L1n {s['l1_normalized']:.4f}  "
              f"L1 {s['l1_unnormalized']:.4f}  gripper {s['gripper_accuracy']:.3f}")
    print(f"report: {out / 'report.json'}  figure: {out / 'report.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
