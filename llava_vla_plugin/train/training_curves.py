"""OUTPUT_DIR/training_curves.png: the loss and validation curves of a run, without REPORT_TO.

Every finished training run writes it (VLATrainer, on the saving rank, at the end of training) from the
Hugging Face trainer's log history, the same records `trainer_state.json` keeps:
  * left: the training loss per logged step;
  * right, when the run had VAL_DATA: the held-out action loss and the teacher-forced accuracies per
    validation (docs: trainer.METRIC_DOC), and, dashed, each dataset's teacher-forced accuracy when the log
    has them (val_<dataset>_action_accuracy_teacher_forced): which dataset of a mixture gains or lags.

Plot an unfinished run, or a checkpoint, from its trainer_state.json:

    python -m llava_vla_plugin.train.training_curves runs/ov-vla [--out curves.png]

(RUN is an OUTPUT_DIR or a checkpoint-N folder; for an OUTPUT_DIR without trainer_state.json the newest
checkpoint's is used.)
"""
from __future__ import annotations

import argparse
import io
import json
import re
import sys
from pathlib import Path
from typing import Iterable, Mapping

from data_tools.atomic import write_bytes

FILE_NAME = "training_curves.png"
VAL_KEYS = (  # (log key, label, axis): loss on the left axis, accuracies on the right
    ("val_action_loss", "held-out action loss", "loss"),
    ("val_action_accuracy_teacher_forced", "held-out accuracy, teacher-forced", "acc"),
    ("val_action_accuracy_teacher_forced_constrained", "held-out accuracy, teacher-forced, action tokens only", "acc"),
)

# a dataset's validation accuracy (trainer.validation_metrics); the mixture-wide key has no <dataset> part
PER_DATASET_ACC = re.compile(r"val_(.+)_action_accuracy_teacher_forced")


def curves(log_history: Iterable[Mapping]) -> tuple[list[tuple[int, float]], dict[str, list[tuple[int, float]]]]:
    """(step, train loss) per logged step, and (step, value) per validation for each VAL_KEYS key and each
    per-dataset accuracy key (PER_DATASET_ACC) the log holds."""
    train: list[tuple[int, float]] = []
    val: dict[str, list[tuple[int, float]]] = {key: [] for key, _, _ in VAL_KEYS}
    for record in log_history:
        step = record.get("step")
        if step is None:
            continue
        if isinstance(record.get("loss"), (int, float)):
            train.append((int(step), float(record["loss"])))
        for key, value in record.items():
            if isinstance(value, (int, float)) and (key in val or PER_DATASET_ACC.fullmatch(key)):
                val.setdefault(key, []).append((int(step), float(value)))
    return train, {k: v for k, v in val.items() if v}


def render_png(log_history: Iterable[Mapping], title: str = "") -> bytes:
    """The figure as PNG bytes (matplotlib's Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    train, val = curves(log_history)
    fig, axes = plt.subplots(1, 2 if val else 1, figsize=(11 if val else 6, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, marker="." if len(train) < 50 else None, linewidth=1)
    else:
        ax.text(0.5, 0.5, "no training loss was logged", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if val:
        ax_loss = axes[0][1]
        ax_acc = ax_loss.twinx()
        for i, (key, label, axis) in enumerate(VAL_KEYS):
            if key in val:
                steps, values = zip(*val[key])
                target = ax_loss if axis == "loss" else ax_acc
                target.plot(steps, values, marker="o", label=label, color=f"C{i}")
        for i, key in enumerate(sorted(k for k in val if PER_DATASET_ACC.fullmatch(k))):
            steps, values = zip(*val[key])
            ax_acc.plot(steps, values, marker=".", linestyle="--", linewidth=1, color=f"C{len(VAL_KEYS) + i}",
                        label=f"{PER_DATASET_ACC.fullmatch(key).group(1)}: accuracy, teacher-forced")
        ax_loss.set(xlabel="optimizer step", ylabel="held-out action loss", title="validation (VAL_DATA)")
        ax_acc.set(ylabel="accuracy", ylim=(-0.02, 1.02))
        ax_loss.grid(alpha=0.3)
        ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
        if train:  # the same step range as the training panel
            ax_loss.set_xlim(ax.get_xlim())
        handles = ax_loss.get_legend_handles_labels()[0] + ax_acc.get_legend_handles_labels()[0]
        ax_loss.legend(handles=handles, fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_training_curves(output_dir: str | Path, log_history: Iterable[Mapping], title: str = "",
                          out: str | Path | None = None) -> Path:
    """Write the figure atomically to `out` (default OUTPUT_DIR/training_curves.png); returns its path."""
    path = Path(out) if out is not None else Path(output_dir) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, render_png(list(log_history), title))
    return path


def find_trainer_state(run: Path) -> Path:
    """RUN/trainer_state.json, else the newest RUN/checkpoint-N/trainer_state.json."""
    if (run / "trainer_state.json").is_file():
        return run / "trainer_state.json"
    found = sorted(run.glob("checkpoint-*/trainer_state.json"),
                   key=lambda p: int(p.parent.name.split("-")[-1]) if p.parent.name.split("-")[-1].isdigit() else -1)
    if not found:
        raise FileNotFoundError(f"{run} holds no trainer_state.json and no checkpoint-N/trainer_state.json: "
                                "pass a training OUTPUT_DIR or one of its checkpoint-N folders")
    return found[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llava_vla_plugin.train.training_curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a training OUTPUT_DIR or a checkpoint-N folder")
    parser.add_argument("--out", type=Path, default=None, help=f"PNG to write (default RUN/{FILE_NAME})")
    args = parser.parse_args(argv)
    try:
        state_file = find_trainer_state(args.run)
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = write_training_curves(args.run, state.get("log_history", []), f"{state_file.parent} (step {state.get('global_step')})",
                                 out=args.out)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
