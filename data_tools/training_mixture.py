"""Make a training mixture from converted datasets: relative weights + a data fraction -> mixture.yaml.

    python -m data_tools.mixture --converted OUT (--weights FILE | --preset NAME)
        [--fraction F] [--weighting balanced|kept_frames|weights|temperature [--alpha A]|remix] [--seed S] -o mixture.yaml

The project has two mixture concepts, named apart: the download spec (data_tools/download_spec.py, presets
in data_tools/mixtures/: what to fetch and convert) and the training mixture (this module plans it,
llava_vla_plugin/core/training_data.py reads it: upstream's --data_path YAML of {json_path, weight}).

What `weight` means (docs/DESIGN.md 2.8 cites this; tests/test_mixture_weight.py checks it):
  - In a download spec, a preset or a --weights file it is OpenVLA's sampling weight w_d. OpenVLA trains
    with `balance_weights=True` (openvla/openvla c8f03f4 prismatic/vla/datasets/rlds/dataset.py:518-520,
    make_interleaved_dataset): dataset d is sampled with probability w_d * n_d / sum(w * n), n_d = its
    num_transitions (dataset_statistics.json).
  - In a training mixture it is a per-file copy multiplier: the loader keeps floor(m) copies of the file's
    f_d train frames plus a seeded fraction m - floor(m) of them, so dataset d's share of the samples is
    m_d * f_d / sum(m * f).
  - Every writer of a training mixture (convert's OUT/mixture.yaml, this tool, the sweep) turns the weights
    into shares with ONE rule, `mixture_shares` below, and then into multipliers m_d = share_d x target / f_d,
    so the trained share is the rule's share to one frame whatever --frames-per-episode kept and at any
    --fraction. The file records the rule (`vla_mixture.weighting`); the trainer logs it.

Weighting rules (`--weighting`; WEIGHTING_RULES; one formula each, all in `mixture_shares`):
  balanced     (default) OpenVLA's: share_d = w_d * n_d / sum(w * n), n_d = num_transitions of the dataset
               as converted (dataset_statistics.json; with convert --stats-from, the published full-dataset
               count). Independent of how many frames --frames-per-episode kept, since n_d counts every
               transition.
  kept_frames  the rule convert used before the rule was recorded: the weight is the copy multiplier itself,
               share_d = w_d * f_d / sum(w * f), f_d = kept train frames. Equals `balanced` only while every
               frame is kept; with --frames-per-episode it favours datasets with short episodes.
  weights      the weights alone: share_d = w_d / sum(w) (this tool's default before `balanced`).
  temperature  share_d proportional to (w_d * n_d) ** alpha (--alpha, default 0.43: pi0's, "we weight each
               task-robot combination by n^0.43", Black et al. 2024, pi0 paper, Sec. V-A). alpha = 1 is
               `balanced`, alpha = 0 gives every dataset the same share; in between it lifts small datasets.
  remix        learned weights: --weights RUN/remix_weights.json, the result of a Re-Mix proxy run (launcher
               REMIX_REFERENCE=<reference run>; data_tools/remix_weights.py has the method and its sources).
               Re-Mix's weights are the domains' sampling distribution, so share_d = w_d / sum(w) over the datasets
               kept. The rule is taken from such a file (and only from one).

Weights (relative, OpenVLA's convention):
  --weights FILE   a YAML mapping {dataset: weight}; or a data_tools mixture file (`datasets:` list of
                   {name, weight}); or a training mixture (`datasets:` list of {json_path, weight}, e.g.
                   the converter's OUT/mixture.yaml); or a YAML list of dataset names (equal weights)
  --preset NAME    a shipped mixture, data_tools/mixtures/NAME.yaml (OpenVLA's named mixtures, `default`)

n_d is the dataset's `num_transitions` from its dataset_statistics.json (manifest.json counts, then its train
frame count, as logged fallbacks). After a `download --fraction` subset, statistics computed on it count the
downloaded transitions; the planner scales them to the full dataset by total / downloaded episodes
(download_manifest.json, `_download_scale`), so datasets downloaded at different fractions keep OpenVLA's
shares. Statistics from convert --stats-from (OpenVLA's published ones) are full counts already.

The written mixture gives every dataset a sampling `weight` relative to its own train frame count
(the trainer keeps floor(weight) copies plus a seeded fraction, see llava_vla_plugin/core/training_data.py),
chosen so that the effective frames follow the shares and add up to `fraction` x the train frames of
the datasets in the mixture. The file is upstream's `--data_path` format with absolute json_paths;
a `vla_mixture:` section (ignored by readers) records how it was made. The seed is recorded there;
the trainer's `--vla_data_seed` chooses which frames a fractional weight keeps.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import logging

import yaml

from data_tools.cli import add_common_flags, add_output, setup_logging
from data_tools.converted_format import MANIFEST_FILE, STATISTICS_FILE, TRAIN_FILE
from data_tools import remix_weights
from data_tools.atomic import write_text_if_changed
from data_tools.weights import WeightError, at_line, entry_lines, parse_weight

log = logging.getLogger("data_tools.training_mixture")

__all__ = [
    "MixtureToolError",
    "WEIGHTING_RULES",
    "DEFAULT_WEIGHTING",
    "PI0_TEMPERATURE_ALPHA",
    "mixture_shares",
    "recorded_weighting",
    "ConvertedDataset",
    "MixtureRow",
    "MixturePlan",
    "converted_datasets",
    "read_weights",
    "plan_mixture",
    "format_table",
    "write_training_mixture",
    "effective_frames",
    "main",
]


class MixtureToolError(ValueError):
    """A user error (bad weights, missing datasets, bad fraction); the message says what to fix."""


# The weighting rules (module docstring: what each means and why). `balanced` is OpenVLA's and the default of
# every writer of a training mixture: convert's OUT/mixture.yaml, this tool, the sweep.
WEIGHTING_RULES = ("balanced", "kept_frames", "weights", "temperature", "remix")
REMIX_SOURCE = "remix:"  # read_weights' label of a Re-Mix result file (the only source of the `remix` rule)
DEFAULT_WEIGHTING = "balanced"
PI0_TEMPERATURE_ALPHA = 0.43  # pi0 (Black et al. 2024, Sec. V-A): each task-robot combination weighted by n^0.43
# The `vla_mixture.weighting` record's absence, in words: what files written before it existed meant.
UNRECORDED_WEIGHTING = ("unknown (written before the mixture file recorded its weighting rule: convert's files of "
                        "that time used kept_frames, the weight being a per-kept-frame copy multiplier)")


def check_weighting(weighting: str, alpha: float | None) -> float | None:
    """The validated alpha of a rule (None unless temperature); MixtureToolError names the bad value."""
    if weighting not in WEIGHTING_RULES:
        raise MixtureToolError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTING_RULES)}")
    if weighting != "temperature":
        if alpha is not None:
            raise MixtureToolError(f"--alpha is the temperature rule's exponent; it means nothing with --weighting {weighting}")
        return None
    alpha = PI0_TEMPERATURE_ALPHA if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
        raise MixtureToolError(f"--alpha must be a number >= 0 (1 = balanced, 0 = uniform, pi0: 0.43), got {alpha!r}")
    return float(alpha)


def mixture_shares(weights: Mapping[str, float], num_transitions: Mapping[str, int], kept_frames: Mapping[str, int],
                   weighting: str = DEFAULT_WEIGHTING, alpha: float | None = None) -> dict[str, float]:
    """{dataset: share of the trained frames} under a weighting rule: THE formula (module docstring), imported by
    every writer of a training mixture so that they cannot disagree. Datasets must have weight > 0."""
    alpha = check_weighting(weighting, alpha)
    names = list(weights)
    bad = [n for n in names if not weights[n] > 0]
    if bad:
        raise MixtureToolError(f"shares need weights > 0; {', '.join(bad)} have {[weights[n] for n in bad]}")
    if weighting in ("weights", "remix"):  # remix: the learned weights are the sampling distribution
        mass = {n: float(weights[n]) for n in names}
    elif weighting == "kept_frames":
        mass = {n: weights[n] * float(kept_frames[n]) for n in names}
    else:
        mass = {n: weights[n] * float(num_transitions[n]) for n in names}
        if weighting == "temperature":
            # 0 ** 0 = 1 would give an empty dataset a share; it has nothing to give
            mass = {n: (m ** alpha if m > 0 else 0.0) for n, m in mass.items()}
    total = sum(mass.values())
    if not total > 0:
        sizes = kept_frames if weighting == "kept_frames" else num_transitions
        raise MixtureToolError(f"--weighting {weighting}: every dataset has size 0 "
                               f"({', '.join(f'{n}: {sizes[n]}' for n in names)})")
    return {n: mass[n] / total for n in names}


def recorded_weighting(spec: Any) -> str:
    """The rule a training mixture file records, in words, for the training log: `weighting` (+ alpha) of its
    `vla_mixture:` section; an older data_tools.mixture file's `balance` flag; else UNRECORDED_WEIGHTING."""
    record = spec.get("vla_mixture") if isinstance(spec, Mapping) else None
    if not isinstance(record, Mapping):
        return UNRECORDED_WEIGHTING
    rule = record.get("weighting")
    if rule is None and isinstance(record.get("balance"), bool):  # data_tools.mixture before the rule was recorded
        return "balanced" if record["balance"] else "weights"
    if rule == "temperature":
        return f"temperature (alpha {record.get('temperature_alpha')})"
    return str(rule) if rule is not None else UNRECORDED_WEIGHTING


@dataclass(frozen=True)
class ConvertedDataset:
    name: str
    train_path: Path
    frames: int  # non-empty lines of train.jsonl: what the trainer reads
    num_transitions: int  # OpenVLA's dataset size (dataset_statistics.json), used by --balance
    transitions_source: str


@dataclass(frozen=True)
class MixtureRow:
    name: str
    relative_weight: float  # as given
    frames: int
    num_transitions: int
    share: float  # intended share of the effective frames
    weight: float  # sampling multiplier written to the mixture
    effective_frames: int  # frames the trainer will actually draw with `weight`


@dataclass(frozen=True)
class MixturePlan:
    converted: Path
    weights_source: str
    fraction: float
    weighting: str  # one of WEIGHTING_RULES
    seed: int
    rows: tuple[MixtureRow, ...]
    excluded: dict[str, str] = field(default_factory=dict)  # dataset -> why it is not in the mixture
    action_conventions: dict[str, str] = field(default_factory=dict)  # dataset -> its declared action convention
    alpha: float | None = None  # the temperature rule's exponent

    @property
    def balance(self) -> bool:
        """OpenVLA's balance_weights (the `balance` key readers of older files know)."""
        return self.weighting == "balanced"

    @property
    def total_frames(self) -> int:
        return sum(r.frames for r in self.rows)

    @property
    def target_frames(self) -> float:
        return self.fraction * self.total_frames

    @property
    def effective_total(self) -> int:
        return sum(r.effective_frames for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "converted": str(self.converted),
            "weights": self.weights_source,
            "fraction": self.fraction,
            "weighting": self.weighting,
            "temperature_alpha": self.alpha,
            "balance": self.balance,
            "seed": self.seed,
            "total_frames": self.total_frames,
            "effective_frames": self.effective_total,
            "datasets": [asdict(r) for r in self.rows],
            "excluded": dict(self.excluded),
            "action_conventions": dict(self.action_conventions),
        }


# ----------------------------------------------------------------------------------------------
# Reading the converted directory


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                n += 1
    return n


def _download_scale(folder: Path) -> tuple[float, str] | None:
    """(full dataset's episodes / downloaded episodes, where it is recorded) when the converted dataset's source
    was a `data_tools.download --fraction` subset; None for a complete download or published statistics.

    OpenVLA's n_d counts the full dataset's transitions. Statistics computed on a downloaded fraction count
    that fraction's, so datasets downloaded at different fractions would be balanced by their downloads, not
    by their sizes. The full count is recorded nowhere (dataset_info.json holds episode counts, not
    transitions): it is estimated as the downloaded transitions x total / downloaded episodes of the splits
    read (download_manifest.json beside the source's dataset_info.json, which convert's manifest names)."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        if str(manifest.get("statistics", "")).startswith("--stats-from"):
            return None  # published statistics: OpenVLA's own full-dataset count
        from data_tools.download import MANIFEST as DOWNLOAD_MANIFEST

        path = Path(manifest["source"]["data_dir"]) / DOWNLOAD_MANIFEST
        splits = json.loads(path.read_text())["splits"]
        read = [s for s in splits.values() if s.get("episodes")]
        total, kept = sum(int(s["total_episodes"]) for s in read), sum(int(s["episodes"]) for s in read)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not kept or total <= kept:
        return None
    return total / kept, f"{path}: {kept} of {total} episodes downloaded"


def _num_transitions(folder: Path, name: str, frames: int) -> tuple[int, str]:
    """OpenVLA's balancing count n_d, from the statistics (scaled to the full dataset when only a fraction was
    downloaded: _download_scale); each fallback is logged as a warning, because balancing by another count
    changes every dataset's share of the mixture."""
    stats_path = folder / STATISTICS_FILE
    try:
        stats = json.loads(stats_path.read_text())
        entry = stats.get(name) if name in stats else (next(iter(stats.values())) if len(stats) == 1 else None)
        if entry and "num_transitions" in entry:
            n = int(entry["num_transitions"])
            scale = _download_scale(folder)
            if scale is None:
                return n, STATISTICS_FILE
            return round(n * scale[0]), f"{STATISTICS_FILE} ({n}) x full/downloaded episodes ({scale[1]})"
        why = f"it has no num_transitions for {name!r}"
    except (OSError, ValueError, AttributeError) as e:
        why = f"cannot read it ({type(e).__name__}: {e})"
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        n = int(manifest["counts"]["num_transitions"])
        log.warning("%s: %s; balancing %s by num_transitions from manifest.json instead", stats_path, why, name)
        return n, MANIFEST_FILE
    except (OSError, ValueError, KeyError, TypeError):
        pass
    log.warning("%s: %s, and manifest.json has no counts: balancing %s by its %d train frames instead of its "
                "transitions (OpenVLA counts every transition); reconvert it to restore the statistics",
                stats_path, why, name, frames)
    return frames, "train frames"


def converted_names(converted: Path) -> list[str]:
    """Datasets of a converted directory: the folders that hold a train.jsonl."""
    return sorted(p.parent.name for p in converted.glob(f"*/{TRAIN_FILE}"))


def converted_datasets(converted: str | Path, names: list[str] | None = None) -> dict[str, ConvertedDataset]:
    """The converted datasets (all, or the given names); frames are counted from train.jsonl."""
    converted = Path(converted).resolve()
    if not converted.is_dir():
        raise MixtureToolError(f"--converted {converted}: not a directory (the output folder of `data_tools convert`)")
    available = converted_names(converted)
    wanted = available if names is None else names
    missing = [n for n in wanted if n not in available]
    if missing:
        have = ", ".join(available) if available else "none (no <dataset>/train.jsonl found)"
        raise MixtureToolError(
            f"not converted in {converted}: {', '.join(missing)}. Converted datasets there: {have}. "
            "Convert them first (python -m data_tools.convert ...) or drop them from the weights."
        )
    out = {}
    for name in wanted:
        folder = converted / name
        frames = _count_lines(folder / TRAIN_FILE)
        n, source = _num_transitions(folder, name, frames)
        out[name] = ConvertedDataset(name, folder / TRAIN_FILE, frames, n, source)
    return out


# ----------------------------------------------------------------------------------------------
# Weights


def _weights_from_data(data: Any, where: str, lines: Mapping[Any, int] | None = None) -> dict[str, float]:
    weights: dict[str, float] = {}
    lines = dict(lines or {})

    def add(name: Any, w: Any, item: Any = None) -> None:
        here = at_line(where, lines, name if item is None else item)
        if not isinstance(name, str) or not name:
            raise MixtureToolError(f"{here}: dataset names must be non-empty strings, got {name!r}")
        if name in weights:
            raise MixtureToolError(f"{here}: {name!r} is listed twice")
        try:
            weights[name] = parse_weight(w, here, name)
        except WeightError as e:
            raise MixtureToolError(str(e)) from None

    if isinstance(data, Mapping) and "datasets" in data:
        entries = data["datasets"]
        if not isinstance(entries, list) or not entries:
            raise MixtureToolError(f"{where}: `datasets` must be a non-empty list")
        for i, e in enumerate(entries):
            if isinstance(e, str):
                add(e, 1.0)
            elif isinstance(e, Mapping) and "name" in e:
                add(e["name"], e.get("weight", 1.0), i)
            elif isinstance(e, Mapping) and "json_path" in e:  # a training mixture: <dataset>/train.jsonl
                add(Path(str(e["json_path"])).parent.name, e.get("weight", 1.0), i)
            else:
                raise MixtureToolError(f"{where}: datasets[{i}] needs `name` (or `json_path`), got {e!r}")
    elif isinstance(data, Mapping):
        for name, w in data.items():
            add(name, w)
    elif isinstance(data, list):
        for name in data:
            add(name, 1.0)
    else:
        raise MixtureToolError(f"{where}: expected a mapping {{dataset: weight}}, a `datasets:` list or a list of names")
    if not weights:
        raise MixtureToolError(f"{where}: no datasets")
    if not any(w > 0 for w in weights.values()):
        raise MixtureToolError(f"{where}: every weight is 0")
    return weights


def read_weights(weights: str | Path | Mapping | None = None, preset: str | None = None) -> tuple[str, dict[str, float]]:
    """(label, {dataset: relative weight}) from a weights file, an inline mapping or a shipped preset."""
    if (weights is None) == (preset is None):
        raise MixtureToolError("give exactly one of --weights FILE and --preset NAME")
    if preset is not None:
        from data_tools.download_spec import named_mixtures

        shipped = named_mixtures()
        if preset not in shipped:
            raise MixtureToolError(f"unknown preset {preset!r}; shipped mixtures: {', '.join(shipped)}")
        path = shipped[preset]
        text = path.read_text()
        return preset, _weights_from_data(yaml.safe_load(text), str(path), entry_lines(text))
    if isinstance(weights, Mapping):
        return "inline", _weights_from_data(dict(weights), "inline weights")
    path = Path(weights)
    if not path.is_file():
        raise MixtureToolError(f"weights file {path} not found")
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise MixtureToolError(f"{path}: not valid YAML: {e}") from None
    if remix_weights.is_remix_result(data):  # a Re-Mix proxy run's learned weights
        try:
            result = remix_weights.result_from_data(data, str(path))
        except remix_weights.RemixFileError as e:
            raise MixtureToolError(str(e)) from None
        return REMIX_SOURCE + str(path.resolve()), _weights_from_data(result.as_weights(), str(path))
    return str(path), _weights_from_data(data, str(path), entry_lines(text))


# ----------------------------------------------------------------------------------------------
# The plan


def effective_frames(frames: int, weight: float) -> int:
    """What llava_vla_plugin.core.training_data.apply_weight yields: floor(w) copies + round(frac * n) frames."""
    whole = math.floor(weight)
    return int(whole * frames + round((weight - whole) * frames))


def _apportion(quotas: Mapping[str, float], total: int) -> dict[str, int]:
    """Integer frame counts close to the quotas that add up to `total` (largest remainders)."""
    counts = {n: math.floor(q) for n, q in quotas.items()}
    left = total - sum(counts.values())
    for n in sorted(quotas, key=lambda n: (-(quotas[n] - math.floor(quotas[n])), n))[: max(left, 0)]:
        counts[n] += 1
    return counts


def action_convention(folder: Path):
    """A converted dataset's declared action convention (manifest.json `action_convention`, written by
    `vla-import`); data converted from RLDS declares none and is OpenVLA's (delta EEF, gripper 1 open / 0 closed)."""
    from data_tools.byod_mapping import ActionConvention

    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        manifest = {}
    return ActionConvention.from_dict(manifest.get("action_convention") if isinstance(manifest, dict) else None)


def check_action_conventions(converted: Path, names: list[str], allow_mixed: bool = False) -> dict[str, str]:
    """{dataset: convention} of the datasets to be mixed; MixtureToolError when they differ (one policy trained on
    a delta and an absolute dataset, or on two gripper signs, learns contradictory targets) unless allow_mixed."""
    conv = {n: action_convention(Path(converted) / n) for n in names}
    if len(set(conv.values())) > 1 and not allow_mixed:
        listed = "; ".join(f"{n}: {c.describe()}" for n, c in conv.items())
        raise MixtureToolError(
            f"the datasets of this mixture declare different action conventions ({listed}). A policy trained on both "
            "learns contradictory actions. Re-import the odd ones with `convention: {to_openvla_gripper: true}` in "
            "their mapping (gripper) or convert their actions to the mixture's convention, leave them out of the "
            "weights, or pass --allow-mixed-action-conventions if you have reconciled them yourself")
    if len(set(conv.values())) > 1:
        log.warning("mixing action conventions (--allow-mixed-action-conventions): %s",
                    "; ".join(f"{n}: {c.describe()}" for n, c in conv.items()))
    return {n: c.describe() for n, c in conv.items()}


def plan_mixture(
    converted: str | Path,
    weights: Mapping[str, float],
    fraction: float = 1.0,
    balance: bool | None = None,
    seed: int = 0,
    weights_source: str = "inline",
    allow_mixed_conventions: bool = False,
    weighting: str | None = None,
    alpha: float | None = None,
) -> MixturePlan:
    """The multipliers that give `weighting`'s shares (mixture_shares) of fraction x the train frames.
    `balance` is the older spelling: True = balanced, False = weights; None (and weighting None) = the default."""
    learned = str(weights_source).startswith(REMIX_SOURCE)
    if weighting is None:
        weighting = "remix" if learned else DEFAULT_WEIGHTING if balance is None or balance else "weights"
    elif balance is not None and balance != (weighting == "balanced"):
        raise MixtureToolError(f"--balance contradicts --weighting {weighting} (--balance is --weighting balanced)")
    if learned != (weighting == "remix"):
        raise MixtureToolError(
            f"{weights_source[len(REMIX_SOURCE):]} holds Re-Mix's learned weights, which are shares already: use "
            f"--weighting remix (the default for such a file), not {weighting}" if learned else
            "--weighting remix takes its weights from a Re-Mix proxy run: --weights RUN/remix_weights.json")
    alpha = check_weighting(weighting, alpha)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (math.isfinite(fraction) and fraction > 0):
        raise MixtureToolError(f"--fraction must be a number > 0 (1 = every train frame once), got {fraction!r}")
    weights = _weights_from_data(dict(weights), weights_source)
    data = converted_datasets(converted, list(weights))
    excluded: dict[str, str] = {}
    used: dict[str, ConvertedDataset] = {}
    for name, w in weights.items():
        if w == 0:
            excluded[name] = "weight 0"
        elif data[name].frames == 0:
            excluded[name] = "no train frames"
        else:
            used[name] = data[name]
    if not used:
        raise MixtureToolError(f"no dataset left to train on ({', '.join(f'{k}: {v}' for k, v in excluded.items())})")
    conventions = check_action_conventions(Path(converted).resolve(), list(used), allow_mixed_conventions)
    shares = mixture_shares({n: weights[n] for n in used}, {n: d.num_transitions for n, d in used.items()},
                            {n: d.frames for n, d in used.items()}, weighting, alpha)
    total_frames = sum(d.frames for d in used.values())
    target = fraction * total_frames
    counts = _apportion({n: shares[n] * target for n in used}, round(target))
    rows = []
    for name, d in used.items():
        mult = counts[name] / d.frames
        eff = effective_frames(d.frames, mult)  # == counts[name]: the reader's rounding recovers it
        rows.append(MixtureRow(name, weights[name], d.frames, d.num_transitions, shares[name], mult, eff))
    return MixturePlan(Path(converted).resolve(), weights_source, float(fraction), weighting, int(seed), tuple(rows),
                       excluded, conventions, alpha)


def format_table(plan: MixturePlan) -> str:
    head = ["dataset", "frames", "transitions", "rel.weight", "share", "weight", "eff.frames", "eff.share"]
    total_eff = plan.effective_total or 1
    body = [[r.name, f"{r.frames:,}", f"{r.num_transitions:,}", f"{r.relative_weight:g}", f"{r.share:.4f}",
             f"{r.weight:.6g}", f"{r.effective_frames:,}", f"{r.effective_frames / total_eff:.4f}"] for r in plan.rows]
    body.append(["TOTAL", f"{plan.total_frames:,}", "", "", "1.0000", "", f"{plan.effective_total:,}", "1.0000"])
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)]
    lines.append(
        f"fraction {plan.fraction:g} of {plan.total_frames:,} train frames -> {plan.effective_total:,} effective frames; "
        f"shares: {describe_weighting(plan.weighting, plan.alpha)}; seed {plan.seed}"
    )
    for name, why in plan.excluded.items():
        lines.append(f"excluded: {name} ({why})")
    return "\n".join(lines)


def describe_weighting(weighting: str, alpha: float | None = None) -> str:
    return {"balanced": "balanced (OpenVLA: weight x num_transitions)",
            "kept_frames": "kept_frames (weight x kept train frames)",
            "weights": "from the weights alone",
            "temperature": f"temperature ((weight x num_transitions) ^ {alpha:g})" if alpha is not None else "temperature",
            "remix": "remix (learned Re-Mix weights)",
            }[weighting]


def mixture_yaml_text(plan: MixturePlan, made_by: str = "`python -m data_tools.mixture`") -> str:
    spec = {
        "datasets": [
            {"json_path": str(plan.converted / r.name / TRAIN_FILE), "sampling_strategy": "all", "weight": r.weight}
            for r in plan.rows
        ],
        "vla_mixture": plan.to_dict(),
    }
    header = (
        f"# Training mixture made by {made_by}; usable as --data_path.\n"
        f"# Images are relative to --image_folder {plan.converted}\n"
        + "".join(f"# {line}\n" for line in format_table(plan).splitlines())
    )
    return header + yaml.safe_dump(spec, sort_keys=False)


def write_training_mixture(plan: MixturePlan, path: str | Path, made_by: str = "`python -m data_tools.mixture`") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = mixture_yaml_text(plan, made_by)
    write_text_if_changed(path, text)  # keeps mtimes of unchanged files
    return path


# ----------------------------------------------------------------------------------------------


def add_weighting_flags(p: argparse.ArgumentParser) -> None:
    """--weighting/--alpha/--balance, shared by this tool and convert (one spelling, one help text)."""
    p.add_argument("--weighting", choices=WEIGHTING_RULES, default=None,
                   help=f"how weights become shares (default {DEFAULT_WEIGHTING}: OpenVLA's weight x num_transitions; "
                        "kept_frames: weight x kept train frames, the old rule; weights: the weights alone; "
                        "temperature: (weight x num_transitions)^alpha; remix: learned weights, from --weights RUN/remix_weights.json)")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"temperature's exponent (default {PI0_TEMPERATURE_ALPHA}, pi0's; 1 = balanced, 0 = uniform)")
    p.add_argument("--balance", action="store_true", help="= --weighting balanced (the default; kept for old commands)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_tools.mixture", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", "--converted", dest="data_dir", required=True,
                   help="output folder of data_tools convert (OUT/<dataset>/train.jsonl) (also: --converted)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", help="YAML {dataset: weight}, a data_tools mixture file, a training mixture, or a Re-Mix "
                                       "proxy run's remix_weights.json (rule remix)")
    src.add_argument("--preset", help="a shipped mixture name (data_tools/mixtures/NAME.yaml), e.g. bridge_rt_1")
    p.add_argument("--fraction", type=float, default=1.0, help="effective frames / train frames of the mixture's datasets (default 1)")
    add_weighting_flags(p)
    p.add_argument("--seed", type=int, default=0, help="recorded in the mixture; pass the same to the trainer's --vla_data_seed")
    p.add_argument("--allow-mixed-action-conventions", action="store_true",
                   help="mix datasets whose declared action conventions differ (delta/absolute EEF, gripper range or "
                        "sign; manifest.json action_convention); refused by default")
    add_output(p, "-o", "--output", type=str, metavar="YAML", help="the training mixture YAML to write")
    add_common_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    try:
        label, weights = read_weights(args.weights, args.preset)
        plan = plan_mixture(args.data_dir, weights, args.fraction, True if args.balance else None, args.seed,
                            weights_source=label, allow_mixed_conventions=args.allow_mixed_action_conventions,
                            weighting=args.weighting, alpha=args.alpha)
    except MixtureToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(plan))
    out = write_training_mixture(plan, args.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
