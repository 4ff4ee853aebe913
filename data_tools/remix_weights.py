"""The one owner of a Re-Mix proxy run's output: OUTPUT_DIR/remix_weights.json (the learned domain weights) and
OUTPUT_DIR/remix_weights.jsonl (one row per update, the curve), plus Re-Mix's update rule as a pure function.

Re-Mix (Hejna et al., "Re-Mix: Optimizing Data Mixtures for Large Scale Imitation Learning", CoRL 2024) learns
the weights of OXE's datasets with DoReMi's distributionally robust optimization: a reference policy is trained
on the mixture, then a proxy policy is trained on the same data while a weight per domain (dataset) follows the
proxy's excess loss over the reference. The learned weights are the average of those weights over the proxy run.
The reference code is jhejna/remix at 7ff87a6 (`scripts/train_remix.py`, `configs/doremi/oxe_rn.py`); every
rule below cites its line there:

  initial weights    alpha_0 = each domain's size, normalized (train_remix.py:142-153: `num_steps` of the
                     dataset statistics; its TODO at :145 says "the weights created by the dataloader", which we
                     take: each domain's share of the proxy's training samples, equal to num_steps under the
                     default `balanced` mixture with equal weights).
  per-sample losses  the model's loss per sample, not reduced over the batch (train_remix.py:155 `reduce=False`;
                     openx/networks/core.py:48-56: the mean over the sample's time steps).
  excess             proxy loss - reference loss per sample (:198), clipped at 0 (:199).
  per-domain excess  the sum of a domain's clipped excess over the batch divided by the number of its NONZERO
                     entries, at least 1 (:171-177: `norm = dot(one_hot, losses != 0)`; samples whose excess
                     was clipped to 0 do not count).
  update             alpha <- alpha * exp(step_size * per-domain excess) (:205), normalized (:206), then
                     smoothed toward alpha_0: (1 - smoothing) * alpha + smoothing * alpha_0 (:207).
                     step_size 0.2 and smoothing 0.05 are the OXE config's (configs/doremi/oxe_rn.py:132-134).
  proxy objective    sum_d alpha_d * per-domain mean of the UNCLIPPED excess (:209-211, "DoReMi says to use the
                     unclipped excess loss here"); its gradient is the proxy's, the reference is constant.
  learned weights    the running mean of alpha over every update, average_alpha (:213; it starts at alpha_0
                     and the first update replaces it, since state.step is 0 then: the mean of alpha_1..alpha_T).

The update is one batch at a time: the reference has no gradient accumulation (one `doremi_step` per batch,
:309-314), so the trainer refuses --gradient_accumulation_steps > 1 with Re-Mix.

This module imports nothing from the plugin: the trainer (llava_vla_plugin/train/remix.py) writes these files
through it, and `python -m data_tools.mixture --weights RUN/remix_weights.json` reads them into an ordinary
training mixture (weighting rule `remix`: the learned weights are the shares).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from data_tools.atomic import write_json

FILE_NAME = "remix_weights.json"  # the learned weights (written at the end of the proxy run)
CURVE_NAME = "remix_weights.jsonl"  # one row per update: step, alpha, average_alpha, per-domain losses
FIGURE_NAME = "remix_weights.png"  # alpha of each domain over the proxy run
FORMAT = "vla_remix/1"
# configs/doremi/oxe_rn.py:132-134 (the OXE proxy run's settings)
REMIX_STEP_SIZE = 0.2
REMIX_SMOOTHING = 0.05
REFERENCE_CODE = "jhejna/remix 7ff87a6 scripts/train_remix.py:142-213, configs/doremi/oxe_rn.py:132-134"


class RemixFileError(ValueError):
    """A file that is not a complete Re-Mix result; the message names it and says what to do."""


def check_hyperparameters(step_size: float, smoothing: float) -> None:
    if not (isinstance(step_size, (int, float)) and math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"Re-Mix step size must be a number > 0 (Re-Mix's OXE runs: {REMIX_STEP_SIZE}), got {step_size!r}")
    if not (isinstance(smoothing, (int, float)) and 0 <= smoothing <= 1):
        raise ValueError(f"Re-Mix smoothing must be in [0, 1] (Re-Mix's OXE runs: {REMIX_SMOOTHING}), got {smoothing!r}")


def per_domain_mean(sums: Sequence[float], nonzero: Sequence[float]) -> list[float]:
    """train_remix.py:171-177: a domain's summed losses over max(count of its nonzero losses, 1)."""
    return [float(s) / max(float(n), 1.0) for s, n in zip(sums, nonzero)]


def update_alpha(alpha: Sequence[float], initial: Sequence[float], per_domain_excess: Sequence[float],
                 step_size: float = REMIX_STEP_SIZE, smoothing: float = REMIX_SMOOTHING) -> list[float]:
    """One exponentiated-gradient step of the domain weights (train_remix.py:205-207), in float64. The exponent is
    shifted by its maximum before exp (the same result after the normalization, without overflow)."""
    top = max(step_size * e for e in per_domain_excess)
    raised = [a * math.exp(step_size * e - top) for a, e in zip(alpha, per_domain_excess)]
    total = sum(raised)
    return [(1.0 - smoothing) * r / total + smoothing * a0 for r, a0 in zip(raised, initial)]


def update_average(average: Sequence[float], alpha: Sequence[float], updates_before: int) -> list[float]:
    """train_remix.py:213: the running mean of alpha; `updates_before` = state.step before this update."""
    return [m + (a - m) / (updates_before + 1) for m, a in zip(average, alpha)]


def initial_alpha(counts: Sequence[float]) -> list[float]:
    """alpha_0: each domain's size normalized to sum 1 (train_remix.py:146-153)."""
    total = float(sum(counts))
    if total <= 0 or any(c < 0 for c in counts):
        raise ValueError(f"Re-Mix needs domain sizes >= 0 with a positive total, got {list(counts)}")
    return [float(c) / total for c in counts]


@dataclass
class RemixResult:
    """OUTPUT_DIR/remix_weights.json. `weights` (the average alpha) is what a mixture uses."""

    domains: list[str]
    weights: list[float]  # average alpha over every update: the learned weights
    initial: list[float]  # alpha_0
    last: list[float]  # alpha after the last update
    updates: int
    step_size: float
    smoothing: float
    reference: str  # the reference run the excess loss was measured against
    domain_samples: list[int] = field(default_factory=list)  # the proxy's training samples per domain
    format: str = FORMAT
    method: str = "Re-Mix (DoReMi group DRO over datasets), " + REFERENCE_CODE

    def as_weights(self) -> dict[str, float]:
        return dict(zip(self.domains, self.weights))

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / FILE_NAME
        write_json(path, asdict(self))
        return path


def is_remix_result(data: Any) -> bool:
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_result(path: str | Path) -> RemixResult:
    """The result of a finished proxy run (a run folder or its remix_weights.json); RemixFileError says what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    if not path.is_file():
        raise RemixFileError(f"{path} not found: a Re-Mix proxy run (launcher REMIX_REFERENCE=<reference run>) writes it "
                             "when it finishes; an unfinished run has only its curve, remix_weights.jsonl")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise RemixFileError(f"{path}: not valid JSON ({e})") from None
    return result_from_data(data, str(path))


def result_from_data(data: Any, where: str) -> RemixResult:
    if not is_remix_result(data):
        raise RemixFileError(f"{where}: not a Re-Mix result (expected \"format\": {FORMAT!r})")
    known = set(RemixResult.__dataclass_fields__)
    try:
        result = RemixResult(**{k: v for k, v in data.items() if k in known})
    except TypeError as e:
        raise RemixFileError(f"{where}: incomplete Re-Mix result ({e})") from None
    n = len(result.domains)
    if not n or len(result.weights) != n or len(set(result.domains)) != n:
        raise RemixFileError(f"{where}: {n} domains and {len(result.weights)} weights: the file is damaged; rerun the proxy")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in result.weights):
        raise RemixFileError(f"{where}: weights must be finite numbers > 0, got {result.weights}")
    return result


def read_curve(directory: str | Path) -> list[dict]:
    """The rows of OUTPUT_DIR/remix_weights.jsonl (one per update), in step order."""
    path = Path(directory) / CURVE_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
