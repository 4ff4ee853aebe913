"""Bring your own data: one writer of the converted format for every importer (LeRobot, HDF5, Python API).

    from data_tools.byod import write_episodes
    write_episodes("converted/", "my_robot", episodes)      # episodes: dicts of arrays (see EpisodeDict)

Each importer only *reads* its format into `EpisodeData` (one episode: primary-view JPEGs, 7-d actions, state,
instruction); everything after that is here and shared, so a LeRobot import, an HDF5 import and an API import
write the same files as `data_tools.convert` (names, sample lines, statistics, per-episode action sequences:
`data_tools/converted_format.py`; statistics and BOUNDS_Q99: `data_tools/normalize.py`), and validate, stats,
the mixture tool and the trainer read them unchanged.

What is the same as convert, and why:
- Work is split into units (one episode each) that write into `OUT/.work/<name>/units/<unit>.tmp` and are
  renamed when complete; the dataset folder appears under OUT only when every unit is done. A killed import
  resumes where it stopped when rerun, and nothing already written is touched.
- A finished or partial import is reused only when its fingerprint (options + the source files' content)
  matches; otherwise the run stops naming what changed (`--overwrite` starts again).
- Output is byte-identical for any `--workers` (units are written independently, merged in episode order).
- Splits: OpenVLA's `train[:95%]` / `train[95%:]` over the source's episodes in order (`val_fraction`).
- Statistics over every finite action of every episode (OpenVLA's split="all"), BOUNDS_Q99 normalization.

What is counted, never silently dropped (manifest.json `counts`, the first entries listed under `skipped`):
frames whose action is not finite (`dropped_frames.nonfinite_action`, also left out of the statistics), and
episodes without an instruction or without actions (`dropped_episodes.<reason>`). Structural problems (a
missing column, a video shorter than its parquet, timestamps off the frame rate) stop the dataset with an
`ImportInputError` naming the file, the episode and the key.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import yaml

from data_tools.atomic import atomic_open, write_file, write_text
from data_tools.byod_mapping import ACTION_DIM, ImportMapping, map_gripper, orient
from data_tools.converted_format import (
    EEF_POS_ABSOLUTE_MASK,
    IMAGE_TOKEN,
    MANIFEST_FILE,
    MIXTURE_FILE,
    STATISTICS_FILE,
    TRAIN_FILE,
    ConvertedSample,
    EpisodeActions,
    converted_dataset_dirs,
    episode_actions_file,
    episode_proprio_file,
    split_file,
)
from data_tools.images import encode_jpeg, frame_jpeg
from data_tools.normalize import compute_statistics, normalize_bounds_q99

TOOL_VERSION = "data_tools.byod 1"
WORK_DIR = ".work"  # the same work folder as data_tools.convert (different dataset names never collide)
SKIPPED_LISTED = 100  # manifest: the first N skipped episodes / frames are listed by name
STATS_MASK = (True,) * 6 + (False,)  # OpenVLA's action_normalization_mask default: the gripper is not normalized

log = logging.getLogger("data_tools.byod")


class ImportInputError(ValueError):
    """The source cannot be imported as it is; the message names the file, the episode and the key."""


class EpisodeSkipped(Exception):
    """One episode is left out (counted under `reason` and listed in the manifest); the others go on."""

    def __init__(self, reason: str, where: str, detail: str = ""):
        super().__init__(f"{where}: {reason}{': ' + detail if detail else ''}")
        self.reason, self.where, self.detail = reason, where, detail


@dataclass
class EpisodeData:
    """One episode, read from any source: what the shared writer needs."""

    index: int  # the sample's `episode`: the episode's position in the source
    frames: Sequence[bytes]  # primary view, one JPEG per step (encoded by the loader, in the worker)
    actions: np.ndarray  # [T, 7] float32, after the mapping (indices, gripper)
    instruction: str
    where: str  # "file ..., episode ..." for messages
    steps: np.ndarray | None = None  # [T] raw step indices (default 0..T-1)
    state: np.ndarray | None = None  # [T, S] proprio
    image_how: str = "encoded"  # counted per frame in the manifest: copied | encoded | reencoded_video


class EpisodeSource(Protocol):
    """What an importer provides. Must be picklable: workers get the source and one ref each."""

    kind: str

    def describe(self) -> dict[str, Any]: ...  # manifest `source`
    def digest(self) -> str: ...  # the source's content, for the fingerprint
    def refs(self) -> list[Any]: ...  # one picklable ref per episode, in source order
    def load(self, ref: Any) -> EpisodeData: ...  # raises ImportInputError / EpisodeSkipped


def finish_actions(actions: np.ndarray, mapping: ImportMapping, where: str) -> np.ndarray:
    """The source's action array -> the converted format's [T, 7] float32 (indices, then the gripper)."""
    a = np.asarray(actions)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ImportInputError(f"{where}: action key {mapping.action_key!r} has shape {a.shape}, expected [steps, dims]")
    if mapping.action_indices is not None:
        if max(mapping.action_indices) >= a.shape[1]:
            raise ImportInputError(f"{where}: action.indices {list(mapping.action_indices)} but {mapping.action_key!r} "
                                   f"has {a.shape[1]} dims")
        a = a[:, list(mapping.action_indices)]
    if a.shape[1] != ACTION_DIM:
        raise ImportInputError(f"{where}: action key {mapping.action_key!r} has {a.shape[1]} dims; the converted format "
                               f"needs {ACTION_DIM} (6 end effector + gripper). Pick them with action.indices in the mapping")
    a = a.astype(np.float32)
    return map_gripper(a, mapping.convention) if mapping.to_openvla_gripper else a


def pixels_to_jpeg(pixels: np.ndarray, mapping: ImportMapping) -> bytes:
    """Raw pixels (H, W, 3 uint8) -> JPEG at the mapping's quality, oriented as the mapping says."""
    px = np.asarray(pixels)
    if px.ndim == 2:
        px = np.repeat(px[..., None], 3, -1)
    if px.ndim != 3 or px.shape[-1] not in (3, 4):
        raise ValueError(f"an image must be [H, W, 3] (or [H, W]), got shape {px.shape}")
    if px.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {px.dtype}")
    return encode_jpeg(np.ascontiguousarray(orient(px[..., :3], mapping.orientation)), mapping.jpeg_quality)


def _files_digest(paths: Iterable[Path], root: Path, block: int = 64 * 1024) -> str:
    """Name, size and the first/middle/last 64 KiB of each file (convert's `source_digest` rule: a replaced
    file with the same name changes it; three small reads per file, not a pass over the data)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"\0{p.relative_to(root)}\0{size}\0".encode())
        with open(p, "rb") as f:
            for off in sorted({0, max(0, size // 2 - block // 2), max(0, size - block)}):
                f.seek(off)
                h.update(f.read(block))
    return h.hexdigest()


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _bump(d: dict[str, int], key: str, n: int = 1) -> None:
    if n:
        d[key] = d.get(key, 0) + n


# ---- one unit (one episode; runs in a worker) ---------------------------------------------------


@dataclass(frozen=True)
class UnitJob:
    source: Any  # an EpisodeSource (picklable)
    ref: Any
    unit_id: str
    work_dir: str

    @property
    def done_dir(self) -> Path:
        return Path(self.work_dir) / "units" / self.unit_id

    @property
    def tmp_dir(self) -> Path:
        return Path(self.work_dir) / "units" / f"{self.unit_id}.tmp"


def episode_digest(ep: EpisodeData) -> str:
    """The content of one episode (frames, actions, state, instruction): the API's resume check."""
    h = hashlib.sha256()
    h.update(ep.instruction.encode())
    for arr in (ep.actions, ep.steps, ep.state):
        if arr is not None:
            h.update(np.ascontiguousarray(arr).tobytes())
    for f in ep.frames:
        h.update(hashlib.sha256(f).digest())
    return h.hexdigest()


def write_unit(job: UnitJob, ep: EpisodeData | None, skipped: EpisodeSkipped | None = None) -> dict[str, Any]:
    """Write one episode's JPEGs and arrays into the unit's temp folder, then rename it (exists only complete)."""
    tmp = job.tmp_dir
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if skipped is not None:
        counts = {"unit": job.unit_id, "skipped": {"reason": skipped.reason, "where": skipped.where, "detail": skipped.detail}}
    else:
        n = len(ep.actions)
        if len(ep.frames) != n:
            raise ImportInputError(f"{ep.where}: {len(ep.frames)} primary-view frames for {n} actions")
        steps = np.arange(n, dtype=np.int64) if ep.steps is None else np.asarray(ep.steps, np.int64)
        finite = np.isfinite(ep.actions).all(axis=1)
        if ep.state is not None and len(ep.state) != n:
            raise ImportInputError(f"{ep.where}: state has {len(ep.state)} rows for {n} actions")
        if IMAGE_TOKEN in ep.instruction:
            raise EpisodeSkipped("image_token_in_instruction", ep.where, f"the instruction contains {IMAGE_TOKEN!r}")
        os.makedirs(tmp / "images")
        for t in np.flatnonzero(finite).tolist():
            write_file(str(tmp / "images" / f"{int(steps[t]):04d}.jpg"), ep.frames[t])
        arrays = {"actions": ep.actions[finite].astype(np.float32), "steps": steps[finite]}
        if ep.state is not None:
            arrays["state"] = np.asarray(ep.state, np.float32)[finite]
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", v)
        bad = [f"{ep.where} step {int(s)}" for s in steps[~finite][:SKIPPED_LISTED]]
        counts = {"unit": job.unit_id, "episode": ep.index, "instruction": ep.instruction, "frames": int(finite.sum()),
                  "nonfinite": int((~finite).sum()), "nonfinite_listed": bad, "image_how": ep.image_how,
                  "image_bytes": int(sum(len(ep.frames[t]) for t in np.flatnonzero(finite))),
                  "digest": episode_digest(ep)}
    write_text(tmp / "counts.json", json.dumps(counts, sort_keys=True))
    shutil.rmtree(job.done_dir, ignore_errors=True)
    os.replace(tmp, job.done_dir)
    return counts


def process_unit(job: UnitJob) -> dict[str, Any]:
    """Load and write one episode; a finished unit (an earlier, killed run) is returned as it is."""
    done = job.done_dir / "counts.json"
    if done.is_file():
        return json.loads(done.read_text())
    try:
        ep = job.source.load(job.ref)
    except EpisodeSkipped as s:
        return write_unit(job, None, s)
    try:
        return write_unit(job, ep)
    except EpisodeSkipped as s:
        return write_unit(job, None, s)


def _process_unit_safe(job: UnitJob) -> dict[str, Any]:
    try:
        return process_unit(job)
    except ImportInputError as e:
        return {"unit": job.unit_id, "error": str(e)}
    except Exception as e:  # noqa: BLE001 - reported for the dataset, with the episode it came from
        return {"unit": job.unit_id, "error": f"{job.ref}: {type(e).__name__}: {e}"}


# ---- finishing a dataset (main process) ---------------------------------------------------------


def split_boundary(n: int, val_fraction: float) -> int:
    """Episodes [0, b) train, [b, n) val: OpenVLA's `train[:95%]` split, b rounded to the closest episode (Python
    round; not checked against tfds' percent-slice rounding for every n)."""
    return int(round(n * (1.0 - val_fraction)))


def finalize(name: str, work: Path, out: Path, unit_ids: Sequence[str], counts: Mapping[str, Mapping[str, Any]],
             val_fraction: float, mapping: ImportMapping, manifest_extra: Mapping[str, Any]) -> dict[str, Any]:
    """Statistics over every kept action, then samples, per-episode sequences, statistics and manifest; the
    dataset folder is renamed into OUT at the end (it appears only complete)."""
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    (final / "images").mkdir(parents=True)
    boundary = split_boundary(len(unit_ids), val_fraction)
    kept = [(i, u) for i, u in enumerate(unit_ids) if "skipped" not in counts[u]]
    rows = [np.load(work / "units" / u / "actions.npy") for _, u in kept]
    total = np.concatenate(rows) if rows else np.zeros((0, ACTION_DIM), np.float32)
    if not len(total):
        raise ImportInputError(f"{name}: no episode with finite actions to import "
                               f"(skipped: {_skip_summary(counts, unit_ids) or 'none'})")
    # The proprio entry over the kept state (OpenVLA's get_dataset_statistics with load_proprio=True, source "state")
    # when every kept episode has one, so PROPRIO=1 can train on it; else over zeros as OpenVLA without proprio.
    state_files = [work / "units" / u / "state.npy" for _, u in kept]
    proprio = None
    if state_files and all(f.is_file() for f in state_files):
        proprio = np.concatenate([np.load(f).reshape(len(a), -1) for f, a in zip(state_files, rows)]).astype(np.float32)
    stats = compute_statistics(total, len(kept), STATS_MASK, proprio=proprio)
    absolute = EEF_POS_ABSOLUTE_MASK if mapping.convention.type == "delta_eef" else (True,) * ACTION_DIM
    split_counts = {s: {"episodes_read": 0, "episodes_kept": 0, "frames": 0, "image_bytes": 0, "images": {},
                        "dropped_episodes": {}, "dropped_frames": {}} for s in ("train", "val")}
    skipped: list[str] = []
    nonfinite_listed: list[str] = []
    per_split_actions: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {"train": {}, "val": {}}
    per_split_state: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {"train": {}, "val": {}}
    state_dim = None
    with atomic_open(final / split_file("train"), "w") as train, atomic_open(final / split_file("val"), "w") as val:
        outputs = {"train": train, "val": val}
        for pos, unit in enumerate(unit_ids):
            c = counts[unit]
            split = "train" if pos < boundary else "val"
            sc = split_counts[split]
            sc["episodes_read"] += 1
            if "skipped" in c:
                _bump(sc["dropped_episodes"], c["skipped"]["reason"])
                if len(skipped) < SKIPPED_LISTED:
                    sk = c["skipped"]
                    skipped.append(f"{sk['where']}: {sk['reason']}" + (f" ({sk['detail']})" if sk["detail"] else ""))
                continue
            udir = work / "units" / unit
            raw = np.load(udir / "actions.npy")
            steps = np.load(udir / "steps.npy")
            _bump(sc["dropped_frames"], "nonfinite_action", c["nonfinite"])
            nonfinite_listed = (nonfinite_listed + c["nonfinite_listed"])[:SKIPPED_LISTED]
            if not len(raw):
                _bump(sc["dropped_episodes"], "no_frames")
                continue
            episode = int(c["episode"])
            norm = normalize_bounds_q99(raw, stats)
            ep_dir = final / "images" / split / f"{episode:06d}"
            os.makedirs(ep_dir.parent, exist_ok=True)
            os.replace(udir / "images", ep_dir)  # moved, not copied: the unit's JPEGs are the dataset's
            for a_raw, a, step in zip(raw, norm, steps.tolist()):
                outputs[split].write(ConvertedSample(name, split, episode, int(step), c["instruction"], a, a_raw).to_json_line())
            per_split_actions[split][episode] = (norm, steps)
            if (udir / "state.npy").is_file():
                state = np.load(udir / "state.npy")
                state_dim = state.shape[1] if state.ndim == 2 else 1
                per_split_state[split][episode] = (state.reshape(len(steps), -1), steps)
            sc["episodes_kept"] += 1
            sc["frames"] += len(raw)
            sc["image_bytes"] += c["image_bytes"]
            _bump(sc["images"], c["image_how"], len(raw))
    for split in ("train", "val"):
        EpisodeActions.from_episodes(per_split_actions[split], absolute).save(final / episode_actions_file(split))
        if state_dim is not None:
            EpisodeActions.from_episodes(per_split_state[split], (True,) * state_dim).save(final / episode_proprio_file(split))
    warnings = []
    for s in ("train", "val"):
        if split_counts[s]["frames"] == 0:
            warnings.append(f"{s} split is empty")
        for reason, n in split_counts[s]["dropped_episodes"].items():
            warnings.append(f"{s}: {n} episodes skipped ({reason}; listed under `skipped`)")
        n = split_counts[s]["dropped_frames"].get("nonfinite_action", 0)
        if n:
            warnings.append(f"{s}: {n} frames skipped for a non-finite action (listed under `skipped_frames`)")
    for w in warnings:
        log.warning("%s: %s", name, w)
    write_text(final / STATISTICS_FILE, json.dumps({name: stats}, indent=2) + "\n")
    images = (manifest_extra.get("source") or {}).get("images")
    if isinstance(images, dict):  # what actually happened to the frames: any not copied byte for byte was re-encoded
        hows = {h for sc in split_counts.values() for h in sc["images"]}
        images["reencoded"] = any(h != "copied" for h in hows)
    manifest = {
        "tool_version": TOOL_VERSION,
        "dataset": name,
        **manifest_extra,
        "mapping": mapping.to_dict(),
        "action_convention": mapping.recorded_convention().to_dict(),
        "unnorm_key": name,
        "splits": {"train": f"episodes[:{boundary}]", "val": f"episodes[{boundary}:]"},
        "split_episodes": {"train": boundary, "val": len(unit_ids) - boundary},
        "statistics": 'computed over every episode (OpenVLA split="all"), finite actions only',
        "counts": {"num_trajectories": len(kept), "num_transitions": int(len(total)), "splits": split_counts},
        "skipped": skipped,
        "skipped_frames": nonfinite_listed,
        "warnings": warnings,
    }
    write_text(final / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
    target = out / name
    os.replace(final, target)
    shutil.rmtree(work, ignore_errors=True)
    try:
        (out / WORK_DIR).rmdir()
    except OSError:
        pass
    write_top_level(out)
    return manifest


def _skip_summary(counts: Mapping[str, Mapping[str, Any]], unit_ids: Sequence[str]) -> str:
    reasons: dict[str, int] = {}
    for u in unit_ids:
        if "skipped" in counts[u]:
            _bump(reasons, counts[u]["skipped"]["reason"])
    return ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))


def write_top_level(out: Path) -> None:
    """OUT/dataset_statistics.json and OUT/mixture.yaml over every finished dataset in OUT. The mixture keeps the
    rule and relative weights an earlier run recorded (`vla_mixture`: convert's or this function's), new datasets
    join with weight 1, and the multipliers are re-planned with that rule (default `balanced`; one formula,
    data_tools/training_mixture.py), since adding a dataset changes every share. A file without the record
    (written before it existed) or with `kept_frames` keeps its weights as the multipliers, as it always did."""
    from data_tools.training_mixture import (DEFAULT_WEIGHTING, MixtureToolError, plan_mixture, recorded_weighting,
                                             write_training_mixture)

    out = Path(out)
    combined: dict[str, Any] = {}
    for d in converted_dataset_dirs(out):
        try:
            combined.update(json.loads((d / STATISTICS_FILE).read_text()))
        except (OSError, ValueError):
            continue
    write_text(out / STATISTICS_FILE, json.dumps(combined, indent=2) + "\n")
    entries, seen = [], set()
    mix = out / MIXTURE_FILE
    spec: Any = {}
    if mix.is_file():
        try:
            spec = yaml.safe_load(mix.read_text()) or {}
            for e in spec.get("datasets") or []:
                name = Path(str(e.get("json_path", ""))).parent.name
                if name in combined and name not in seen:
                    entries.append(e)
                    seen.add(name)
        except (yaml.YAMLError, AttributeError):
            spec = {}
    record = spec.get("vla_mixture") if isinstance(spec, dict) and isinstance(spec.get("vla_mixture"), dict) else None
    rule = DEFAULT_WEIGHTING if not mix.is_file() else (recorded_weighting(spec).split(" ")[0] if record else None)
    rule = None if rule == "unknown" else rule
    trainable = [n for n in sorted(combined) if (out / n / TRAIN_FILE).is_file()]
    if rule not in (None, "kept_frames"):
        rows = {r.get("name"): r.get("relative_weight", 1.0) for r in (record or {}).get("datasets") or [] if isinstance(r, dict)}
        weights = {n: float(rows.get(n, 1.0)) for n in trainable}
        try:
            plan = plan_mixture(out, weights, float((record or {}).get("fraction") or 1.0), seed=int((record or {}).get("seed") or 0),
                                weights_source=str((record or {}).get("weights") or "vla-import"), weighting=rule,
                                alpha=(record or {}).get("temperature_alpha") if rule == "temperature" else None,
                                allow_mixed_conventions=True)  # vla-mixture is where mixed conventions are refused
            write_training_mixture(plan, mix, made_by="`vla-import` (data_tools/byod.py)")
            return
        except MixtureToolError as e:  # e.g. no dataset has train frames yet: the plain list below, said why
            log.warning("%s: written without a weighting rule (%s)", mix, e)
    for name in trainable:
        if name not in seen:
            entries.append({"json_path": str((out / name / TRAIN_FILE).resolve()), "sampling_strategy": "all", "weight": 1.0})
    text = "# LLaVA-NeXT --data_path file; images are relative to --image_folder " + str(out.resolve()) + "\n"
    body = {"datasets": entries, **({"vla_mixture": {"weighting": "kept_frames", "fraction": None}} if rule == "kept_frames" else {})}
    write_text(mix, text + yaml.safe_dump(body, sort_keys=False))


# ---- orchestration ------------------------------------------------------------------------------


@dataclass
class ImportOptions:
    val_fraction: float = 0.05
    workers: int = 1
    overwrite: bool = False
    progress: bool = True


def _check_name(name: str) -> None:
    if not name or "/" in name or name.startswith(".") or name != name.strip():
        raise ImportInputError(f"dataset name {name!r}: use a plain folder name (it is also the unnorm_key)")


def _prepare_work(out: Path, name: str, fingerprint: str, inputs: Mapping[str, Any], overwrite: bool) -> Path | None:
    """The work folder for a new or resumed import; None when OUT/<name> already holds this very import.
    Refuses (ImportInputError) an earlier import or partial run made from other inputs."""
    target, work = out / name, out / WORK_DIR / name
    if overwrite:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    if target.exists():
        recorded = _read_json(target / MANIFEST_FILE)
        if recorded.get("fingerprint") == fingerprint:
            log.info("%s: already imported in %s (same source content and options), skipping", name, target)
            return None
        raise ImportInputError(f"{target} was written from other inputs ({_changed(recorded.get('inputs'), inputs)}). "
                               "Rerun with the same source and options to reuse it, --out elsewhere to keep both, or "
                               "--overwrite to import again")
    plan = work / "plan.json"
    if plan.is_file():
        recorded = _read_json(plan)
        if recorded.get("fingerprint") != fingerprint:
            raise ImportInputError(f"{work} holds a partial import made from other inputs "
                                   f"({_changed(recorded.get('inputs'), inputs)}); resuming would mix the two. Rerun "
                                   "with its source and options to resume it, or pass --overwrite to start again")
    (work / "units").mkdir(parents=True, exist_ok=True)
    for stale in (work / "units").glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)  # a killed run's unfinished unit is redone from scratch
    write_text(plan, json.dumps({"fingerprint": fingerprint, "inputs": inputs}, indent=2, sort_keys=True) + "\n")
    return work


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _changed(old: Any, new: Mapping[str, Any]) -> str:
    if not isinstance(old, Mapping):
        return "not recorded in detail"
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "differs in: " + ", ".join(diff) if diff else "the source files' content differs"


def import_source(source: EpisodeSource, out: str | Path, name: str, mapping: ImportMapping,
                  opts: ImportOptions = ImportOptions()) -> dict[str, Any]:
    """Import every episode of `source` into OUT/<name>; returns the manifest. Raises ImportInputError (bad
    input, naming file/episode/key) or OutputWriteError (naming the output file)."""
    from tqdm import tqdm

    out = Path(out)
    _check_name(name)
    if not 0 <= opts.val_fraction < 1:
        raise ImportInputError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    out.mkdir(parents=True, exist_ok=True)
    refs = source.refs()
    if not refs:
        raise ImportInputError(f"{source.describe().get('path', source.kind)}: no episodes found")
    inputs = {"tool_version": TOOL_VERSION, "source_kind": source.kind, "mapping": mapping.to_dict(),
              "val_fraction": opts.val_fraction, "episodes": len(refs)}
    fingerprint = _json_digest({"inputs": inputs, "source": source.digest()})
    work = _prepare_work(out, name, fingerprint, inputs, opts.overwrite)
    if work is None:
        return _read_json(out / name / MANIFEST_FILE)
    jobs = [UnitJob(source, ref, f"{i:06d}", str(work)) for i, ref in enumerate(refs)]
    counts: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    bar = tqdm(total=len(jobs), desc=name, unit="ep", disable=not opts.progress, dynamic_ncols=True)
    frames = 0

    def on_result(job: UnitJob, res: dict[str, Any]) -> None:
        nonlocal frames
        if "error" in res:
            errors.append(res["error"])
        else:
            counts[job.unit_id] = res
            frames += res.get("frames", 0)
        bar.update(1)
        bar.set_postfix(frames=frames)

    if opts.workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            on_result(job, _process_unit_safe(job))
            if errors:
                break
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # spawn, as convert: a forked copy of a parent holding decoder threads is not safe
        with ProcessPoolExecutor(opts.workers, mp_context=mp.get_context("spawn")) as pool:
            futures = [pool.submit(_process_unit_safe, job) for job in jobs]
            for job, fut in zip(jobs, futures):
                try:
                    res = fut.result()
                except BrokenProcessPool as e:
                    res = {"unit": job.unit_id, "error": f"worker process died: {e}"}
                on_result(job, res)
    bar.close()
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ImportInputError(errors[0] + more + ". Finished episodes are kept: fix the input and rerun to resume")
    extra = {"source": source.describe(), "inputs": inputs, "fingerprint": fingerprint}
    return finalize(name, work, out, [j.unit_id for j in jobs], counts, opts.val_fraction, mapping, extra)


# ---- the Python API -----------------------------------------------------------------------------

API_DEFAULTS = ImportMapping(views={"primary": "primary"}, state="state", action_key="action", instruction="instruction")


def _api_episode(index: int, raw: Mapping[str, Any], mapping: ImportMapping) -> EpisodeData:
    """One dict of the API -> EpisodeData: views {name: [T, H, W, 3] uint8}, state [T, S], action [T, 7],
    instruction str."""
    where = f"episode {index}"
    if not isinstance(raw, Mapping):
        raise ImportInputError(f"{where}: expected a dict with views, action, instruction; got {type(raw).__name__}")
    if mapping.action_key not in raw:
        raise EpisodeSkipped("no_actions", where, f"no {mapping.action_key!r} key")
    instruction = mapping.instruction_text or raw.get(mapping.instruction or "instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise EpisodeSkipped("no_instruction", where, "empty or missing instruction")
    views = raw.get("views")
    if not isinstance(views, Mapping) or not views:
        raise ImportInputError(f"{where}: `views` must be a dict {{camera: [T, H, W, 3] uint8 array}}")
    key = mapping.primary if mapping.primary in views else next(iter(views))
    actions = finish_actions(raw[mapping.action_key], mapping, f"{where}: {mapping.action_key}")
    try:
        frames = [pixels_to_jpeg(px, mapping) for px in views[key]]
    except ValueError as e:
        raise ImportInputError(f"{where}: views[{key!r}]: {e}") from None
    state = raw.get(mapping.state) if mapping.state else None
    if state is not None:
        state = np.asarray(state, np.float32).reshape(len(actions), -1)
    return EpisodeData(index, frames, actions, instruction, where, state=state, image_how="encoded")


def write_episodes(out: str | Path, name: str, episodes: Iterable[Mapping[str, Any]], *,
                   mapping: ImportMapping | Mapping[str, Any] | None = None, val_fraction: float = 0.05,
                   overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Write `episodes` (an iterable of dicts) as the converted dataset OUT/<name>; returns its manifest.

    Each episode: {"views": {"primary": uint8 [T, H, W, 3], ...}, "action": [T, 7], "instruction": str,
    "state": [T, S] (optional)}. `mapping` (a dict as in a mapping YAML, or an ImportMapping) declares the
    action convention and renames keys. Episodes are processed in order in this process (the iterable may
    be a generator); a rerun after a crash skips the episodes already written, after checking each one's
    content is the same as before (a changed episode is refused, never mixed in).
    """
    from tqdm import tqdm

    from data_tools.byod_mapping import parse_mapping

    m = mapping if isinstance(mapping, ImportMapping) else parse_mapping(mapping, API_DEFAULTS, "mapping")
    out = Path(out)
    _check_name(name)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"tool_version": TOOL_VERSION, "source_kind": "python_api", "mapping": m.to_dict(), "val_fraction": val_fraction}
    target, work = out / name, out / WORK_DIR / name
    if overwrite:
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    previous = _read_json(target / MANIFEST_FILE) if target.exists() else None
    if previous is None:
        base = _json_digest({"inputs": inputs})
        # the plan's fingerprint covers the options; each unit's digest covers its episode (checked below)
        work = _prepare_work(out, name, base, inputs, False)
    unit_ids: list[str] = []
    counts: dict[str, dict[str, Any]] = {}
    digests: list[str] = []
    for i, raw in enumerate(tqdm(episodes, desc=name, unit="ep", disable=not progress)):
        uid = f"{i:06d}"
        unit_ids.append(uid)
        try:
            ep, skip = _api_episode(i, raw, m), None
            digest = episode_digest(ep)
        except EpisodeSkipped as s:
            ep, skip, digest = None, s, hashlib.sha256(str(s).encode()).hexdigest()
        digests.append(digest)
        if previous is not None:
            continue
        job = UnitJob(None, None, uid, str(work))
        done = job.done_dir / "counts.json"
        if done.is_file():
            recorded = json.loads(done.read_text())
            if recorded.get("digest") != digest:
                raise ImportInputError(f"{work}: episode {i} differs from the one a partial run wrote; resuming would "
                                       "mix the two. Pass overwrite=True to start again")
            counts[uid] = recorded
            continue
        if skip is not None:
            counts[uid] = write_unit(job, None, skip)
            counts[uid]["digest"] = digest
            write_text(job.done_dir / "counts.json", json.dumps(counts[uid], sort_keys=True))
        else:
            try:
                counts[uid] = write_unit(job, ep)
            except EpisodeSkipped as s:
                counts[uid] = write_unit(job, None, s)
    fingerprint = _json_digest({"inputs": inputs, "episodes": digests})
    if previous is not None:
        if previous.get("fingerprint") == fingerprint:
            log.info("%s: already written in %s (same episodes and options), skipping", name, target)
            return previous
        raise ImportInputError(f"{target} was written from other episodes or options; pass overwrite=True to "
                               "write it again, or another name")
    if not unit_ids:
        raise ImportInputError(f"{name}: `episodes` yielded no episode")
    extra = {"source": {"kind": "python_api"}, "inputs": {**inputs, "episodes": len(unit_ids)}, "fingerprint": fingerprint}
    return finalize(name, work, out, unit_ids, counts, val_fraction, m, extra)
